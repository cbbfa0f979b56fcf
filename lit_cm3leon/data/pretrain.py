"""Retrieval-augmented pretraining data: ``<bos> d1 <sep> d2 <sep> d3 <sep> q <eos>`` + CM3.

Every training pair (caption, image codes) gets ``n_retrieved`` documents drawn from its
retrieval candidates (the memory bank searched with the pair's image and with its caption,
20% of the caption's words dropped; see :mod:`lit_cm3leon.retrieval.strategy`). Candidates are
searched once per pair when the datamodule is set up, only for the pairs the run's
``max_steps`` will read, and cached beside the run's outputs (a longer run adds its new pairs);
the draw of documents, the modality order and the CM3 spans change at every visit.

Items are indexed by a global sample counter ``i``: epoch ``i // N`` reshuffles the pairs, and
every random choice of item ``i`` comes from ``default_rng([seed, i])``. So a run is the same
whatever the number of workers, and resuming at step ``s`` only needs the sampler to start
at ``s * batch_size`` (:class:`ResumableSampler`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lit_cm3leon.data.collate import collate_fn, pad_item
from lit_cm3leon.data.shards import TokenShards, shapes_scene
from lit_cm3leon.objective.cm3 import CM3Transform, loss_weights
from lit_cm3leon.objective.sequence import build_sequence, pair_document
from lit_cm3leon.retrieval.bank_docs import UNSEARCHED
from lit_cm3leon.tokenizer.codec import DocumentCodec
from lit_cm3leon.tokenizer.text import TextTokenizer
from lit_cm3leon.tokenizer.vocab import Vocab

log = logging.getLogger(__name__)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch ``epoch`` of a shuffled stream reads ``n`` pairs."""
    return np.random.default_rng([seed, 7919, epoch]).permutation(n)


class BoxCaptions:
    """The shapes-world scene records of ``shards`` captioned with their shapes' boxes
    (:meth:`ShapesWorld.caption_boxes`: ``<loc:N>`` tokens in place of the position words),
    made on first use; ``None`` for landmark views and for other sources."""

    def __init__(self, shards: TokenShards) -> None:
        self.shards, self.world = shards, shards.shapes_world()
        self._texts: dict[int, str | None] = {}

    def __call__(self, row: int) -> str | None:
        if row not in self._texts:
            scene = self.world and shapes_scene(self.world, self.shards.records[row])
            self._texts[row] = self.world.caption_boxes(scene) if scene else None
        return self._texts[row]


def scene_rows(shards: TokenShards, max_shapes: int) -> np.ndarray:
    """The rows of shapes-world scenes (not landmark views) with at most ``max_shapes`` shapes."""
    world = shards.shapes_world()
    if world is None:
        raise ValueError(
            f"data.max_shapes reads the scenes of shapes-world shards; {shards.root} holds "
            f"{shards.manifest.get('source', {}).get('source', 'shards without a source')!r} records"
        )
    scenes = (shapes_scene(world, rec) for rec in shards.records)
    rows = [r for r, sc in enumerate(scenes) if sc is not None and len(sc.shapes) <= max_shapes]
    if not rows:
        raise ValueError(f"no scene in {shards.root} has at most {max_shapes} shapes")
    return np.asarray(rows, dtype=np.int64)


class PairSequences(Dataset):
    """Map-style view over a virtual stream of ``length`` retrieval-augmented sequences."""

    def __init__(
        self,
        shards: TokenShards,
        codec: DocumentCodec,
        candidates: np.ndarray | None,
        seq_len: int,
        length: int,
        seed: int = 0,
        n_retrieved: int = 3,
        p_fewer: float = 0.75,
        image_first_prob: float = 0.5,
        cm3: CM3Transform | None = None,
        query_weight: float = 1.0,
        shuffle: bool = True,
        bank: TokenShards | None = None,
        box_caption_prob: float = 0.0,
        rows: np.ndarray | None = None,
    ) -> None:
        self.shards, self.codec, self.vocab = shards, codec, codec.vocab
        # the shard rows the stream reads (all by default)
        self.rows = np.arange(len(shards)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.bank = bank if bank is not None else shards  # the rows candidates point at
        if not 0.0 <= box_caption_prob <= 1.0:
            raise ValueError(f"box_caption_prob must be in [0, 1], got {box_caption_prob}")
        self.box_caption_prob = box_caption_prob
        self._box_captions = (
            {id(s): BoxCaptions(s) for s in (self.shards, self.bank)} if box_caption_prob else {}
        )
        self.candidates = candidates  # int64 [N, M] of rows in the bank (-1 = none), or None
        self.seq_len, self.length, self.seed = seq_len, length, seed
        self.n_retrieved, self.p_fewer, self.image_first_prob = (
            n_retrieved,
            p_fewer,
            image_first_prob,
        )
        self.cm3, self.query_weight, self.shuffle = cm3, query_weight, shuffle
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:
        return self.length

    def _row(self, i: int) -> int:
        n = len(self.rows)
        epoch, j = divmod(i, n)
        if not self.shuffle:
            return int(self.rows[j])
        if epoch != self._perm_epoch:
            self._perm = epoch_order(self.seed, epoch, n)
            self._perm_epoch = epoch
        return int(self.rows[self._perm[j]])

    def rows_visited(self) -> np.ndarray:
        """The sorted shard rows that the ``length`` items of the stream read (every row once
        the stream is at least an epoch long): the only ones that need retrieval candidates."""
        n = len(self.rows)
        if self.length >= n:
            return np.sort(self.rows)
        head = epoch_order(self.seed, 0, n)[: self.length] if self.shuffle else range(self.length)
        return np.sort(self.rows[np.asarray(head, dtype=np.int64)])

    def doc_ids(
        self, shards: TokenShards, row: int, image_first: bool, rng: np.random.Generator
    ) -> list[int]:
        text = shards.text(row)
        if self.box_caption_prob and rng.random() < self.box_caption_prob:
            text = self._box_captions[id(shards)](row) or text
        doc = pair_document(text, shards.codes[row], image_first=image_first)
        return self.codec.encode(doc)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(i)])
        row = self._row(int(i))
        query = self.doc_ids(
            self.shards, row, image_first=rng.random() < self.image_first_prob, rng=rng
        )
        retrieved: list[list[int]] = []
        if self.candidates is not None and self.n_retrieved > 0:
            pool = self.candidates[row]
            if pool[0] == UNSEARCHED:
                raise RuntimeError(
                    f"training pair {row} was read but never searched for candidates"
                )
            pool = pool[pool >= 0]
            k = self.n_retrieved
            if rng.random() < self.p_fewer:  # also see 0..k-1 documents, as at inference
                k = int(rng.integers(0, self.n_retrieved))
            for r in rng.choice(pool, size=min(k, len(pool)), replace=False):
                retrieved.append(
                    self.doc_ids(
                        self.bank, int(r), image_first=rng.random() < self.image_first_prob, rng=rng
                    )
                )
        room = self.seq_len + 1 - (self.cm3.max_extra_tokens if self.cm3 is not None else 0)
        ids = build_sequence(query, retrieved, self.vocab, context_len=room)  # never cuts an image
        if self.cm3 is not None:
            ids = self.cm3(ids, rng)
        weights = loss_weights(ids, self.vocab, query_weight=self.query_weight)
        return pad_item(ids, weights, self.seq_len, self.vocab.pad)


class ResumableSampler(Sampler[int]):
    """Indices ``start, start+1, ...`` of this rank's slice; its state is the next index.

    ``start`` counts this rank's items already consumed in the (single) epoch. The length stays
    the whole epoch's, as Lightning counts a resumed epoch's batches from its beginning: a length
    that shrank with ``start`` would end the epoch early and replay data.
    """

    def __init__(self, length: int, rank: int = 0, world: int = 1) -> None:
        self.length, self.rank, self.world = length, rank, world
        self.start = 0

    def __iter__(self):
        return iter(range(self.start * self.world + self.rank, self.length, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world))


def train_loader(ds: Dataset, trainer, batch_size: int, num_workers: int, collate) -> DataLoader:
    """This rank's slice of ``ds`` in batches, starting where ``trainer`` resumes (its global
    step x gradient accumulation x ``batch_size`` items already consumed); no trainer: rank 0 of 1."""
    sampler = ResumableSampler(
        len(ds), trainer.global_rank if trainer else 0, trainer.world_size if trainer else 1
    )
    if trainer is not None:
        sampler.start = trainer.global_step * trainer.accumulate_grad_batches * batch_size
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        drop_last=True,
        collate_fn=collate,
    )


def candidates_cache_key(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12]


def retrieval_identity(shards: TokenShards, retriever) -> tuple[str, str, str]:
    """What cached candidates depend on beyond the config: the shard rows they point at (their
    doc ids in order), the memory bank's content (manifest checksum) and the encoder's weights.
    Folder paths alone are not enough: rebuilding the shards, the bank or the retriever in place
    would otherwise reuse candidates searched with the old ones."""
    rows = hashlib.sha256(np.ascontiguousarray(shards.doc_ids, dtype=np.int64).tobytes())
    return (
        rows.hexdigest()[:16],
        str(retriever.bank.manifest.get("checksum", "")),
        str(retriever.encoder.hash),
    )


class PretrainDataModule(L.LightningDataModule):
    """Pre-tokenized pairs + memory-bank retrieval -> CM3 sequences for the decoder."""

    def __init__(
        self,
        tokens_dir: str,
        heldout_tokens_dir: str,
        text_tokenizer_dir: str,
        index_dir: str | None,
        retriever_dir: str | None,
        cache_dir: str,
        seq_len: int = 384,
        image_tokens: int = 64,
        batch_size: int = 8,
        num_workers: int = 0,
        packing: bool = True,
        max_steps: int = 1000,
        n_retrieved: int = 3,
        candidate_pool: int = 8,
        p_fewer: float = 0.75,
        image_first_prob: float = 0.5,
        query_weight: float = 1.0,
        box_caption_prob: float = 0.0,
        max_shapes: int | None = None,
        val_size: int = 256,
        val_retrieve_k: int = 2,
        cm3: dict | None = None,
        retrieval: dict | None = None,
        seed: int = 0,
        max_bad_fraction: float = 0.01,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_ds: PairSequences | None = None
        self.val_ds: PairSequences | None = None
        self._opened: tuple | None = None

    # --- setup ---------------------------------------------------------------------------
    def _codec(self) -> DocumentCodec:
        root = Path(self.hparams.text_tokenizer_dir)
        return DocumentCodec(TextTokenizer.load(root), Vocab.load(root / "vocab.json"))

    def _retriever(self):
        from lit_cm3leon.retrieval.bank_docs import open_retriever

        hp = self.hparams
        if not hp.index_dir or not hp.retriever_dir:
            return None
        return open_retriever(hp.index_dir, hp.retriever_dir, hp.retrieval)

    def _train_candidates(self, shards: TokenShards, retriever, rows: np.ndarray) -> np.ndarray:
        """Candidates [N, pool] with every row in ``rows`` searched: read from the cache, the
        rows it lacks searched and added to it (a longer run searches only its new rows)."""
        from lit_cm3leon.retrieval.bank_docs import training_candidates

        hp = self.hparams
        key = candidates_cache_key(
            "per-pair-rng",
            hp.tokens_dir,
            hp.index_dir,
            len(shards),
            hp.seed,
            hp.retrieval,
            hp.candidate_pool,
            *retrieval_identity(shards, retriever),
        )
        path = Path(hp.cache_dir) / f"train_candidates-{key}.npy"
        cands = np.load(path, allow_pickle=False) if path.is_file() else None  # key: its shape
        missing = rows if cands is None else rows[cands[rows, 0] == UNSEARCHED]
        if len(missing) == 0:
            return cands
        log.info(
            "searching retrieval candidates for the %d of %d training pairs this run reads "
            "(once; cached at %s)",
            len(missing),
            len(shards),
            path,
        )
        cands = training_candidates(
            retriever, shards, hp.candidate_pool, seed=hp.seed, rows=missing, out=cands
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, cands)
        tmp.replace(path)
        return cands

    def _train_sequences(self, train: TokenShards, codec: DocumentCodec) -> PairSequences:
        """The training stream (no candidates yet): as long as every optimizer step's batches."""
        hp = self.hparams
        world = max(1, self.trainer.world_size) if self.trainer else 1
        accumulate = self.trainer.accumulate_grad_batches if self.trainer else 1
        length = hp.max_steps * accumulate * hp.batch_size * world
        cm3 = CM3Transform(codec.vocab, **(hp.cm3 or {})) if hp.cm3 is not None else None
        return PairSequences(
            train,
            codec,
            None,
            hp.seq_len,
            length,
            seed=hp.seed,
            n_retrieved=hp.n_retrieved,
            p_fewer=hp.p_fewer,
            image_first_prob=hp.image_first_prob,
            cm3=cm3,
            query_weight=hp.query_weight,
            box_caption_prob=hp.box_caption_prob,
            rows=None if hp.max_shapes is None else scene_rows(train, hp.max_shapes),
        )

    def _open(self):
        """(codec, training shards, retriever or None), opened once per process."""
        if self._opened is None:
            hp = self.hparams
            train = TokenShards(hp.tokens_dir, max_bad_fraction=hp.max_bad_fraction)
            wanted = hp.n_retrieved > 0 or hp.val_retrieve_k > 0
            self._opened = (self._codec(), train, self._retriever() if wanted else None)
        return self._opened

    def prepare_data(self) -> None:
        """Search the retrieval candidates of the pairs this run reads, once: Lightning calls
        this in one process per node before ``setup`` runs on every rank, so DDP ranks find
        them in the cache instead of each searching the same rows into the same file."""
        if self.hparams.n_retrieved <= 0:
            return
        codec, train, retriever = self._open()
        if retriever is not None:
            self._train_candidates(
                train, retriever, self._train_sequences(train, codec).rows_visited()
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_ds is not None:
            return
        hp = self.hparams
        codec, train, retriever = self._open()
        heldout = TokenShards(hp.heldout_tokens_dir, max_bad_fraction=hp.max_bad_fraction)
        self.train_ds = self._train_sequences(train, codec)
        if retriever and hp.n_retrieved > 0:  # cached by prepare_data (searched here otherwise)
            self.train_ds.candidates = self._train_candidates(
                train, retriever, self.train_ds.rows_visited()
            )
        n_val = min(hp.val_size, len(heldout))
        val_cands = None
        if retriever is not None and hp.val_retrieve_k > 0:  # inference mode: search by caption
            from lit_cm3leon.retrieval.bank_docs import prompt_rows

            val_cands = prompt_rows(
                retriever, train, [heldout.text(i) for i in range(n_val)], hp.val_retrieve_k
            )
        self.val_ds = PairSequences(
            heldout,
            codec,
            val_cands,
            hp.seq_len,
            n_val,
            seed=hp.seed + 1,
            n_retrieved=hp.val_retrieve_k,
            p_fewer=0.0,
            image_first_prob=0.0,
            cm3=None,
            shuffle=False,
            bank=train,
        )

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return train_loader(
            self.train_ds, self.trainer, hp.batch_size, hp.num_workers, self._collate()
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_ds, batch_size=self.hparams.batch_size, collate_fn=self._collate()
        )

    def _collate(self):
        return collate_fn(self.hparams.packing, self.train_ds.vocab.pad)
