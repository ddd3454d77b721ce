"""Support for the DeepSpeed engine (`distrib.deepspeed_engine`) that needs no DeepSpeed import."""
