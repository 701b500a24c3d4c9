"""For the scripts that account memory by tensor (importable: torchrun_command and the
benchmarks put this folder on the path): torch.profiler's CPU allocation events (every tensor
torch allocates and frees, with the running total of live bytes; not glibc's pages, which
peak_rss.PeakRSS sees), told apart by the phase of a PPO update they happen in.

    Phases(update)                      # labels each pass and each optimizer step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        update.step(batch)
    timeline = Timeline(prof)
    timeline.peaks()                    # phase -> (peak live bytes, live bytes at its start)
    timeline.live_at_peak()             # the tensors live at the peak: (bytes, maker)
"""

from __future__ import annotations

from typing import Any


class Phases:
    """Labels each pass of a PPOUpdate (rl.passes.Passes.run: "reference forward", "policy
    forward", "policy forward/backward", ...) and each optimizer step ("policy optimizer
    step") with a record_function range."""

    def __init__(self, update: Any) -> None:
        from torch.profiler import record_function

        names = {id(update.reference): "reference"}
        for name, trainable in update.trainables.items():
            names[id(trainable.model)] = name
            step = trainable.step

            def labelled(*a, _step=step, _name=name, **k):
                with record_function(f"phase:{_name} optimizer step"):
                    return _step(*a, **k)

            trainable.step = labelled
        run = update.passes.run

        def labelled_run(model, parts, loss, forward_only):
            what = "forward" if forward_only else "forward/backward"
            with record_function(f"phase:{names[id(model)]} {what}"):
                return run(model, parts, loss, forward_only)

        update.passes.run = labelled_run


def _maker(event: Any) -> str:
    """The op that allocated, and the backward function it ran in, if any."""
    names, node = [], event.parent
    while node is not None:
        names.append(node.name)
        node = node.parent
    op = next((n for n in names if not n.startswith(("aten::empty", "aten::resize"))), "?")
    backward = next((n for n in names if n.startswith("autograd::engine")), "")
    return f"{op} [{backward.split(': ')[-1]}]" if backward else op


class Timeline:
    """The CPU allocations of a profile taken with profile_memory=True, in time order:
    (time, bytes (negative: a free), address, live bytes after it, maker), live bytes counted
    from the profile's start (tensors made before it are not in the count)."""

    def __init__(self, prof: Any) -> None:
        from torch._C._profiler import _EventType

        def walk(nodes):
            for n in nodes:
                yield n
                yield from walk(n.children)

        allocs, phases = [], []
        for e in walk(prof.profiler.kineto_results.experimental_event_tree()):
            if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
                f = e.extra_fields
                allocs.append([e.start_time_ns, f.alloc_size, f.ptr, f.total_allocated, e])
            elif e.name.startswith("phase:"):
                phases.append((e.name[6:], e.start_time_ns, e.end_time_ns))
        allocs.sort(key=lambda a: a[0])
        # the reporter's running total carries what earlier profiles left live: start at 0
        offset = allocs[0][3] - allocs[0][1] if allocs else 0
        self.allocs = [(t, size, ptr, total - offset, e) for t, size, ptr, total, e in allocs]
        self.phases = sorted(phases, key=lambda p: p[1])

    def peaks(self) -> dict[str, tuple[int, int]]:
        """phase -> (its peak of live bytes, live bytes when it starts); a phase that runs
        several times (one per minibatch) keeps its highest."""
        out: dict[str, tuple[int, int]] = {}
        for name, start, end in self.phases:
            inside = [a[3] for a in self.allocs if start <= a[0] <= end]
            before = [a[3] for a in self.allocs if a[0] < start]
            if inside:
                got = (max(inside), before[-1] if before else 0)
                out[name] = max(out.get(name, got), got)
        return out

    def peak(self) -> int:
        return max((a[3] for a in self.allocs), default=0)

    def live_at_peak(self) -> tuple[str, list[tuple[int, str]]]:
        """(the phase of the peak, the tensors live at the peak: (bytes, maker))."""
        at = max(range(len(self.allocs)), key=lambda i: self.allocs[i][3])
        live: dict[int, tuple[int, Any]] = {}
        for _t, size, ptr, _total, e in self.allocs[: at + 1]:
            if size > 0:
                live[ptr] = (size, e)
            else:
                live.pop(ptr, None)
        when = self.allocs[at][0]
        phase = next((n for n, s, e in self.phases if s <= when <= e), "?")
        return phase, [(size, _maker(e)) for size, e in live.values()]
