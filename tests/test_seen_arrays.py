import gc
import weakref

import mlx.core as mx

from policy_core.seen_arrays import SeenArrays


def test_seen_arrays_tell_replaced_arrays_and_hold_none_alive():
    arrays = [mx.zeros(3), mx.ones(3)]
    seen = SeenArrays()
    assert not seen.same(arrays)
    seen.remember(arrays)
    assert seen.same(arrays) and seen.same(list(arrays))
    assert not seen.same([arrays[0], mx.ones(3)])  # equal values, another array
    assert not seen.same(arrays[:1])
    replaced = weakref.ref(arrays[1])
    arrays[1] = mx.ones(3)
    gc.collect()
    assert replaced() is None  # a cache keeps no replaced weights in memory
    assert not seen.same(arrays)
