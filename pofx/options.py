"""Every allowed value of pofx's options, defined once (imports without JAX).

The library's functions, the experiment configs and their validation all read these tuples.
"""

# Kernel backends (`pofx_backends`): "auto" resolves on the machine at hand; "xla" is the core's
# own operations; "cpu", "gpu", "tpu" the optional backends of those platforms.
KERNEL_BACKENDS = ("auto", "xla", "cpu", "gpu", "tpu")
