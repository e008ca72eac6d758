"""Can a teacher's next-token distributions be compared with a student's? Decided from config and tokenizer files
only, before any weights load.

Two models share a vocabulary when their tokenizers map the same strings to the same ids. Their embedding
matrices may still have different row counts: checkpoints pad the embedding past the tokenizer (Qwen2.5-0.5B has
151,936 rows, Qwen2.5-7B 152,064, for one tokenizer of 151,665 tokens). Those extra rows are no tokens, so the
heads are sliced to the rows both have; only different tokens are refused.
"""

from __future__ import annotations

from minift.config import ConfigError
from minift.model.load import load_tokenizer, resolve_model_path


class VocabularyError(ConfigError):
    """The student's and the teacher's tokenizers do not map the same tokens to the same ids."""


def embedding_rows(name_or_path: str, *, trust_remote_code: bool = False) -> int:
    """The LM head's row count, ``vocab_size`` in the model's config.json (no weights read)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    return config.get_text_config().vocab_size


def first_difference(student, teacher) -> int | None:
    """The lowest id the two tokenizers spell differently (or that only one of them has); None if they agree."""
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    if student_vocab == teacher_vocab:
        return None
    by_id = [{i: t for t, i in v.items()} for v in (student_vocab, teacher_vocab)]
    return min(i for i in set(by_id[0]) | set(by_id[1]) if by_id[0].get(i) != by_id[1].get(i))


def shared_vocabulary(student_path: str, teacher_path: str, *, trust_remote_code: bool = False) -> int:
    """The number of LM-head rows to compare (the smaller embedding's), after checking that the tokenizers agree;
    :class:`VocabularyError` names both sizes and the first ids that differ, with their strings."""
    tokenizers = [load_tokenizer(p, trust_remote_code=trust_remote_code) for p in (student_path, teacher_path)]
    rows = [embedding_rows(p, trust_remote_code=trust_remote_code) for p in (student_path, teacher_path)]
    where = first_difference(*tokenizers)
    if where is not None:
        spell = [t.convert_ids_to_tokens(where) if where < len(t) else "<none>" for t in tokenizers]
        raise VocabularyError(
            f"the teacher {teacher_path} has another vocabulary than the student {student_path}: "
            f"{len(tokenizers[1]):,} tokens ({rows[1]:,} embedding rows) against {len(tokenizers[0]):,} "
            f"({rows[0]:,} rows); they first differ at id {where}: student {spell[0]!r}, teacher {spell[1]!r}. "
            f"Logit distillation needs one tokenizer: pick a teacher of the student's family, or distill from "
            f"the teacher's text instead (recipes/cot_distill.py, or sequence-level KD)")
    shared = min(rows)
    if shared < len(tokenizers[0]):
        raise VocabularyError(f"an embedding has {shared:,} rows, fewer than the tokenizer's {len(tokenizers[0]):,} "
                              f"tokens: {student_path if rows[0] == shared else teacher_path} cannot emit every token")
    return shared
