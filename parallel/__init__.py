"""Model-agnostic distributed layer: the process-group mesh, autograd-aware collectives, tensor-,
sequence-, context- and data-parallel primitives. Imports nothing from megassm."""

from parallel.collectives import record_communication, send_to_next_rank
from parallel.context import ParallelContext, init_parallel
from parallel.context_parallel import incoming_state
from parallel.data_parallel import reduce_gradients
from parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardedSegments,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    full_tensor,
    layer_input,
    local_piece,
    mark_sequence_parallel,
    shard_parameter,
    vocab_parallel_cross_entropy,
    vocab_parallel_logits,
)

__all__ = [
    "ColumnParallelLinear",
    "ParallelContext",
    "RowParallelLinear",
    "ShardedSegments",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "full_tensor",
    "incoming_state",
    "init_parallel",
    "layer_input",
    "local_piece",
    "mark_sequence_parallel",
    "record_communication",
    "reduce_gradients",
    "send_to_next_rank",
    "shard_parameter",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_logits",
]
