"""Stand-in of ``modules.lowvram``: under --medvram one part of the model sits on the GPU at a time."""

module_in_gpu = None
calls = 0


def send_everything_to_cpu():
    global module_in_gpu, calls
    calls += 1
    if module_in_gpu is not None:
        module_in_gpu.to("cpu")
    module_in_gpu = None
