"""The engine core: run state, model plumbing, data, evaluation, the Hessian/OBS kernels and the
layer-by-layer calibration engine. It imports no stage and nothing of the application."""
