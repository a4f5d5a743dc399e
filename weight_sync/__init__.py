"""Kiln weight sync: move trainer weights into inference engines (bucketed, gloo/NCCL group or CUDA IPC, verified)."""

from weight_sync.buckets import FlatLayout, bucket_named_tensors
from weight_sync.checksum import TensorChecksum, checksum_report, compare_checksums, tensor_checksum
from weight_sync.config import WeightSyncConfig
from weight_sync.errors import WeightChecksumError, WeightSyncError, WeightSyncTimeoutError
from weight_sync.group import WeightUpdateGroup
from weight_sync.ipc import ColocatedBucket, SharedBucket, SharedStorages, open_bucket, share_bucket
from weight_sync.push import PushStats, push_weights
from weight_sync.receiver import WeightReceiver
from weight_sync.sender import WeightSender

__all__ = [
    "ColocatedBucket", "FlatLayout", "PushStats", "SharedBucket", "SharedStorages", "TensorChecksum",
    "WeightChecksumError", "WeightReceiver", "WeightSender", "WeightSyncConfig", "WeightSyncError",
    "WeightSyncTimeoutError", "WeightUpdateGroup", "bucket_named_tensors", "checksum_report", "compare_checksums",
    "open_bucket", "push_weights", "share_bucket", "tensor_checksum",
]
