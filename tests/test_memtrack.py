import gc

import torch

from swkernels.memtrack import LiveBytes


def test_counts_new_storages_not_views_and_releases_them():
    x = torch.empty(1000)  # exists before the mode: not counted
    with LiveBytes() as mem:
        v = x[:500]  # a view: no allocation
        assert mem.current == 0
        y = torch.empty(1000)  # 4000 B, rounded up to 4096
        z = y * 2
        assert mem.current == 2 * 4096
        del y, z, v
        gc.collect()
        assert mem.current == 0
        assert mem.peak == 2 * 4096


def test_peak_phase_is_recorded():
    with LiveBytes() as mem:
        mem.phase = "small"
        a = torch.empty(10)
        mem.phase = "big"
        b = torch.empty(10_000)
        del a, b
    assert mem.peak_phase == "big"


def test_phase_peaks_are_kept_per_phase():
    with LiveBytes() as mem:
        mem.phase = "a"
        x = torch.empty(1000)  # 4096 B
        del x
        gc.collect()
        mem.phase = "b"
        y = torch.empty(10)  # 512 B
    assert mem.phase_peaks["a"] == 4096
    assert mem.phase_peaks["b"] == 512
    del y
