"""Our lm-eval tasks, shipped in the wheel: YAML configs here, their data in data/.

- solar_manual_ppl  held-out reference-manual perplexity (loglikelihood_rolling)
- solar_manual_qa   reference-manual multiple choice (acc, acc_norm)
- solar_arith       arithmetic word problems, exact match GSM8K-style (generate_until + regex)
- h6                the Open LLM Leaderboard v1 preset the SOLAR paper reports (Hub data)
`tag: solar` names the first three. `catalog` finds tasks (ours, a user's --include-path,
lm-eval's own); `loaders` is what the YAMLs call to read data/ (no download). data/ is built
by `solar_merge.demo.data.build_task_data()` (see data/manifest.json).
"""
