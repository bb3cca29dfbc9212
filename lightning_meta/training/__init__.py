"""The training runtime: the algorithm contract (`MetaAlgorithm`, the surrogate loss), the shared
inner loop and meta-batch execution, the host `MetaLearningModule`, scaling (precision, FSDP2),
checkpoints, episode statistics, plots and the progress bar. Builds on `learners` and `data`;
the algorithm implementations (`lightning_meta.algorithms`) build on it."""
