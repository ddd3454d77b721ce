"""What the tests share: the one tiny model (`tiny`) and running `distrib train` and reading its
metrics (`runs`)."""
