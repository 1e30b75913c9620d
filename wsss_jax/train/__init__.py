"""The one trainer and what it needs: `loop.fit` drives every trained phase (resume or start,
steps, logging, validation hooks, checkpoints); `checkpoint` wraps orbax (atomic saves,
fingerprints, refusal of another model's steps); `train_state` and `optim` are the state and its
optax update; `earlier_runs` loads what a phase reads from an earlier run (a classifier, a
segmenter, pretrained weights), `run_record` owns the workdir's config.json, `writers` the
metric files and TensorBoard events, `progress` the done / total, rate, eta line, `preemption`
the stop at a SIGTERM / SIGINT (agreed between processes).
"""
