"""Imported by the fork server that stage processes are forked from (runner._context), never
by anyone else: what every stage imports (~6 s and ~0.5 GB together), once instead of once per
stage.

gc.freeze() then moves every object imported here out of the garbage collector's sight: a
forked stage's collections would otherwise write to their headers and so copy the pages they
live on into the stage (copy-on-write: each stage would hold its own copy of them).

The warnings these imports raise are kept (IMPORT_WARNINGS), not printed: the fork server
has no log file of its own, so each stage shows them in its log (runner._child), where its
own imports would have put them."""

# ruff: noqa: F401
import gc
import warnings

with warnings.catch_warnings(record=True) as IMPORT_WARNINGS:
    import datasets
    import lm_eval.evaluator
    import lm_eval.models.huggingface
    import lm_eval.tasks
    import matplotlib.pyplot
    import mergekit.merge
    import peft
    import torch
    import transformers.models.llama.modeling_llama
    import trl.trainer.dpo_trainer
    import trl.trainer.sft_trainer

    import solar_merge.stages.cpt
    import solar_merge.stages.dpo
    import solar_merge.stages.sft

gc.freeze()
