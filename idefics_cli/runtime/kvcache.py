"""Key/value caches whose layers keep spare room, so a decode step writes its new positions in place.

`new_cache(config=None, layers=None, spare=SPARE)`: a transformers `DynamicCache` of append-only [batch, heads,
capacity, dim] buffers (a full one is replaced by one `spare` longer). A tensor assigned to `.keys`/`.values` is adopted
as full, never written, so a cached prefix is only read; what is attended to is DynamicCache's (bit-identical greedy).
"""

from __future__ import annotations

SPARE = 128  # positions a buffer keeps beyond what it holds when it grows
_classes: dict = {}


def _adopt(tensor):
    """A tensor assigned from outside as [buffer, start, end]: full, so never written in place."""
    if tensor is None:
        return None
    return [tensor, 0, tensor.shape[-2] if tensor.dim() > 1 else 0]  # 1-d: DynamicLayer's first empties


def _view(slot):
    if slot is None:
        return None
    buffer, start, end = slot
    return buffer if start == 0 and end == buffer.shape[-2] else buffer[:, :, start:end]


def _append(slot, new, spare: int):
    """Write `new` after the filled part of `slot` (in place while there is room); the filled part's view."""
    buffer, start, end = slot
    n = new.shape[-2]
    if buffer.shape[-2] < end + n:
        length = end - start
        grown = new.new_empty((*new.shape[:-2], length + n + spare, new.shape[-1]))
        if length:
            grown[:, :, :length] = buffer[:, :, start:end]
        buffer, start, end = grown, 0, length
    buffer[:, :, end:end + n] = new
    slot[:] = [buffer, start, end + n]
    return buffer[:, :, start:end + n]


def layer_classes() -> dict:
    """{"full_attention": layer class, "sliding_attention": layer class} (made once)."""
    if _classes:
        return _classes
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    class _Room:
        """What both layers share: `.keys`/`.values` as views of append-only buffers."""

        def __init__(self, *args, spare: int = SPARE, **kwargs):
            self.spare = spare
            super().__init__(*args, **kwargs)

        keys = property(lambda self: _view(self._k), lambda self, tensor: setattr(self, "_k", _adopt(tensor)))
        values = property(lambda self: _view(self._v), lambda self, tensor: setattr(self, "_v", _adopt(tensor)))

        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)  # device, the window's tensor; 1-d empties
            self.keys = key_states.new_empty((*key_states.shape[:-2], 0, key_states.shape[-1]))
            self.values = value_states.new_empty((*value_states.shape[:-2], 0, value_states.shape[-1]))

        def _write(self, key_states, value_states):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            return _append(self._k, key_states, self.spare), _append(self._v, value_states, self.spare)

    class RoomLayer(_Room, DynamicLayer):
        """`DynamicLayer` (full attention) writing in place."""

        def update(self, key_states, value_states, *args, **kwargs):
            return self._write(key_states, value_states)

        def get_seq_length(self) -> int:
            return self._k[2] - self._k[1] if self.is_initialized and self._k is not None else 0

    class RoomSlidingLayer(_Room, DynamicSlidingWindowLayer):
        """`DynamicSlidingWindowLayer` writing in place: the window's start moves on; growing drops the rest."""

        def update(self, key_states, value_states, *args, **kwargs):
            self.cumulative_length += key_states.shape[-2]
            keys, values = self._write(key_states, value_states)
            if self.record_past:  # kept whole until `crop`, as the base class does
                visible = self.sliding_window - 1 + key_states.shape[-2]
                return keys[:, :, -visible:], values[:, :, -visible:]
            for slot in (self._k, self._v):  # keep the last sliding_window - 1 positions
                slot[1] = max(slot[1], slot[2] - (self.sliding_window - 1))
            return keys, values

    _classes.update({"full_attention": RoomLayer, "sliding_attention": RoomSlidingLayer,
                     "chunked_attention": RoomSlidingLayer})
    return _classes


def owned_cache(buffers: list, length: int):
    """A cache over buffers it owns ([rows, heads, capacity, dim] per layer, the first `length` positions filled),
    written in place by decode steps."""
    cache = new_cache(layers=[(k[:, :, :length], v[:, :, :length]) for k, v in buffers])
    for layer, (k, v) in zip(cache.layers, buffers):
        layer._k, layer._v = [k, 0, length], [v, 0, length]
    return cache


def new_cache(config=None, layers=None, spare: int = SPARE):
    """A `DynamicCache` of in-place layers: for `config`'s decoder, or full-attention ones over `layers`
    [(keys, values)], adopted."""
    from transformers import DynamicCache
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, get_layer_types_and_kwargs

    classes = layer_classes()
    cache = DynamicCache()
    if config is not None:
        types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        cache.layers = [classes[t](spare=spare, **kw) if t in classes else DYNAMIC_LAYER_TYPE_MAPPING[t](**kw)
                        for t, kw in zip(types, kwargs)]
    else:
        cache.layers = []
        for keys, values in layers:
            layer = classes["full_attention"](spare=spare)
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values  # adopted: copied at the first update, never written
            cache.layers.append(layer)
    cache.layer_class_to_replicate = None
    return cache
