"""Every recipe stage kind, by the key that names it in a recipe. Adding a kind: its module
(see solar_merge.kinds) and one line here."""

from solar_merge.kinds import eval, merge, search, sweep, synth_math, train, upscale

KINDS = {
    "upscale": upscale,
    "train": train,
    "merge": merge,
    "eval": eval,
    "sweep": sweep,
    "synth_math": synth_math,
    "search": search,
}
