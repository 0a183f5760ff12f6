"""Mean wall time of one decode forward, the cost ratio c = draft step / target step rests on.

Every engine that times its forwards uses `StepTimer`: on a GPU it records CUDA events around the
forward (no synchronisation per step, so timing does not slow the decoding it measures), on a CPU
it reads ``time.perf_counter``. A forward is timed by its input width (tokens fed): the mean is
over the forwards of the first width in ``widths`` that has any, so an engine chooses which
forwards count as "one step".
"""

from __future__ import annotations

import time


class StepTimer:
    """Times forwards with `start` / `stop`, or every forward of a module after `attach`.

    ``widths``: the input widths recorded, in order of preference for `mean_s`; forwards of any
    other width are not recorded.
    """

    def __init__(self, device, widths: tuple[int, ...] = (1,)):
        import torch

        device = torch.device(device)
        self.cuda = device.type == "cuda"
        self._stream = torch.cuda.current_stream(device) if self.cuda else None
        self.widths = tuple(widths)
        self._samples: dict[int, list] = {w: [] for w in self.widths}

    def start(self):
        """A mark to pass to `stop` after the forward."""
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record(self._stream)
            return event
        return time.perf_counter()

    def stop(self, started, width: int = 1) -> None:
        """Record the forward begun at `started`, if its input width is one of ``widths``."""
        samples = self._samples.get(width)
        if samples is None:
            return
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record(self._stream)
            samples.append((started, event))
        else:
            samples.append(time.perf_counter() - started)

    def attach(self, module) -> list:
        """Time every forward of `module` (hooks); returns the hook handles to remove."""
        pending: list = []  # the start mark and input width of the forward in progress

        def pre(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            width = ids.shape[-1] if ids is not None else 0
            pending[:] = [self.start(), width] if width in self._samples else []

        def post(_module, args, kwargs, output):
            if pending:
                self.stop(*pending)
                pending.clear()

        return [
            module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post, with_kwargs=True),
        ]

    def mean_s(self) -> float | None:
        """Seconds per forward; on a GPU call it after the device is synchronised."""
        for width in self.widths:
            samples = self._samples[width]
            if samples:
                if self.cuda:
                    total = sum(a.elapsed_time(b) for a, b in samples) / 1000.0
                else:
                    total = sum(samples)
                return total / len(samples)
        return None
