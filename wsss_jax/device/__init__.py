"""The only code that knows about devices: `parallel` (the data x fsdp mesh, shardings of the
state and batch, multi-host helpers) and `kernels` (CPU convolution rewrites and the attention
kernels a config field chooses). Models call these through config fields, never module globals.
"""
