"""Engines: the `Engine` protocol and shared step machinery (`base`), the native engine
(`native`), the DeepSpeed engine (`deepspeed/`), the optimizer and LR schedules (`optim`), and
`build.build_engine`, which makes one from a config."""
