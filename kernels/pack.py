"""int4 packing along the output dimension (FORMAT.md §4).

packed[j, k] = (q[2j+1, k] << 4) | (q[2j, k] & 0x0F): two's-complement nibbles, low nibble = even row.
"""
import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[n, k] integers in [-8, 7] → int8 [n/2, k]."""
    if q.dim() != 2 or q.shape[0] % 2:
        raise ValueError(f"pack_int4 needs a 2-D tensor with an even number of rows, got {tuple(q.shape)}")
    q = q.to(torch.int16)
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack_int4: values outside [-8, 7]")
    lo, hi = q[0::2] & 0x0F, (q[1::2] & 0x0F) << 4
    # Values 128..255 wrap to negative int8: the byte's bit pattern is what is stored.
    return (hi | lo).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [n/2, k] → int8 [n, k] in [-8, 7]."""
    b = packed.to(torch.int16)
    lo = b & 0x0F
    lo = torch.where(lo > 7, lo - 16, lo)
    hi = b >> 4  # arithmetic shift of the signed byte gives the signed high nibble
    q = torch.empty((packed.shape[0] * 2, packed.shape[1]), dtype=torch.int8)
    q[0::2], q[1::2] = lo.to(torch.int8), hi.to(torch.int8)
    return q
