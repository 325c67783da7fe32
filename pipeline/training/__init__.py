"""Training of the built-in tiny DiffusionGemma model on the verifiable tasks, and its quality harness.

data.py      task stream (train split only), prompt/canvas encoding, batches bucketed by prompt length
objective.py uniform re-noising and the self-conditioned cross-entropy of DiffusionGemma
loop.py      the seeded training loop, progress logs, periodic held-out accuracy, HF-layout checkpoint
evaluate.py  held-out accuracy through canvasflow's DiffusionSampler
quality.py   the sampler-settings grid of jobs/eval_quality.py: table and plot
config.py    the dataclass schemas of conf/train_tiny.yaml and conf/eval_quality.yaml
"""
