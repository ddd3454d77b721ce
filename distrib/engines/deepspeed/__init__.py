"""The DeepSpeed engine: its config translation (`config`, no DeepSpeed import), process group
(`env`), update gate and optimizer (`gate`), the engine (`engine`) and its builder (`build`)."""
