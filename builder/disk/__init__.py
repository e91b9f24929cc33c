"""Pure-Python disk writers: GPT (gpt.py) and a FAT32 formatter + populator (fat32.py).

Both write in place into a sparse image file opened 'r+b' and touch only metadata and
file data, so the image stays sparse.
"""
from __future__ import annotations

from builder.disk.fat32 import (Fat32Geometry, Fat32Result, FatExtent, FatFile,
                                check_name, min_fat32_bytes, plan_fat32, write_fat32)
from builder.disk.gpt import GptPartition, usable_lbas, write_gpt

__all__ = ["Fat32Geometry", "Fat32Result", "FatExtent", "FatFile", "GptPartition",
           "check_name", "min_fat32_bytes", "plan_fat32", "usable_lbas", "write_fat32",
           "write_gpt"]
