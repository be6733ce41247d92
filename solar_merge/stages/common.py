"""The names solar_merge.kinds, recipe/preload.py and sweep.py still import from here; their
homes are stages/chat.py and stages/distributed.py. Removed once those import them there."""

from solar_merge.stages.chat import chat_template_problem, has_chat_template  # noqa: F401
from solar_merge.stages.distributed import HASH_FILE, prepare_work  # noqa: F401
