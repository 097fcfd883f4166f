"""Model-agnostic distributed layer: the process-group mesh, autograd-aware collectives, tensor-,
sequence-, context- and data-parallel primitives. Imports nothing from megassm."""

from parallel.chunked_loss import IGNORE_INDEX, LOSS_CHUNK_TOKENS, vocab_parallel_linear_cross_entropy
from parallel.collectives import record_communication, send_to_next_rank
from parallel.context import ParallelContext, init_parallel
from parallel.context_parallel import incoming_state
from parallel.data_parallel import DDPEngine, global_grad_norm
from parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardedSegments,
    layer_input,
    local_piece,
    shard_parameter,
)
from parallel.roles import REPLICATED, ParamRole, declare_roles, param_roles, roles_of
from parallel.vocab_parallel import VocabParallelEmbedding, VocabParallelLMHead, vocab_parallel_logits

__all__ = [
    "REPLICATED",
    "ParamRole",
    "declare_roles",
    "param_roles",
    "roles_of",
    "IGNORE_INDEX",
    "LOSS_CHUNK_TOKENS",
    "ColumnParallelLinear",
    "DDPEngine",
    "ParallelContext",
    "RowParallelLinear",
    "ShardedSegments",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "global_grad_norm",
    "incoming_state",
    "init_parallel",
    "layer_input",
    "local_piece",
    "record_communication",
    "send_to_next_rank",
    "shard_parameter",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_logits",
]
