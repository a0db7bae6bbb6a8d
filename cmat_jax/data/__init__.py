"""Training data: JSONL readers, chat-template tokenization with assistant-only loss masks,
first-fit packing with segment ids, seeded dataset mixing and a resumable batch iterator (SFT);
rollout / expert `TrainRow`s packed into CMAT batches (`rows`)."""

from cmat_jax.data.config import DataConfig
from cmat_jax.data.conversation import Conversation, Message
from cmat_jax.data.dataset import DatasetStats, TokenizedDataset, load_dataset, load_datasets
from cmat_jax.data.errors import DataError
from cmat_jax.data.iterator import SFTBatchIterator, build_iterator
from cmat_jax.data.masking import TokenizedExample, tokenize_conversation
from cmat_jax.data.packing import assemble_rows
from cmat_jax.data.readers import parse_record, read_jsonl

__all__ = [
    "Conversation",
    "DataConfig",
    "DataError",
    "DatasetStats",
    "Message",
    "SFTBatchIterator",
    "TokenizedDataset",
    "TokenizedExample",
    "assemble_rows",
    "build_iterator",
    "load_dataset",
    "load_datasets",
    "parse_record",
    "read_jsonl",
    "tokenize_conversation",
]
