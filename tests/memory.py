"""Measuring what autograd keeps alive for backward, for memory tests that do not time or sample the process."""


class SavedBytes:
    """Live and peak bytes of the tensors autograd saves for backward while its hooks are active
    (``torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack)``); a saved tensor counts until its graph
    is freed."""

    def __init__(self):
        self.live, self.peak = 0, 0

    def pack(self, t):
        return _Held(t, self)

    @staticmethod
    def unpack(held):
        return held.t


class _Held:
    def __init__(self, t, meter):
        self.t, self.meter, self.size = t, meter, t.numel() * t.element_size()
        meter.live += self.size
        meter.peak = max(meter.peak, meter.live)

    def __del__(self):
        self.meter.live -= self.size
