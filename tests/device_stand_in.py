"A stand-in for a GPU tensor on a machine without a GPU, for tests of the code paths that must move results to the host."
import torch


class DeviceOnlyTensor(torch.Tensor):
    """Behaves as a tensor on another device would where it matters: mixing it with a CPU tensor, or handing it to
    numpy/pandas, raises; `.cpu()` (or `.to('cpu')`) returns a plain CPU tensor. Metadata (shape, dtype) and
    operations among stand-ins still work, as they would on the device."""
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cpu or (func is torch.Tensor.to and 'cpu' in map(str, (*args[1:], *kwargs.values()))):
            with torch._C.DisableTorchFunctionSubclass(): return func(*args, **kwargs).as_subclass(torch.Tensor)
        if func in (torch.Tensor.numpy, torch.Tensor.__array__):
            raise TypeError("can't convert a device tensor to numpy: copy it to the host first")
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(type(t) is torch.Tensor and t.dim() > 0 for t in tensors):
            raise RuntimeError('Expected all tensors to be on the same device (a stand-in device tensor met a CPU tensor)')
        return super().__torch_function__(func, types, args, kwargs)


def on_stand_in_device(tensor: torch.Tensor) -> DeviceOnlyTensor:
    return tensor.as_subclass(DeviceOnlyTensor)
