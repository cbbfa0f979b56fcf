"""Packed training batches compute what padded ones compute, in fewer rows."""

from __future__ import annotations

import numpy as np
import torch

from lit_cm3leon.data.collate import PackedCollate, pad_item
from lit_cm3leon.model import ModelConfig
from lit_cm3leon.objective.sequence import attention_mask_from_doc_ids
from lit_cm3leon.tokenizer.vocab import Vocab
from lit_cm3leon.training.cm3leon_module import CM3LeonModule

VOCAB = Vocab(n_text=40, n_image=16, image_h=3, image_w=3)
SEQ_LEN = 48


def make_items(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Sequences of 13-35 ids: text, then one or two 9-token images, loss on 80% of tokens."""
    rng = np.random.default_rng(seed)
    v = VOCAB
    items = []
    for _ in range(n):
        ids = [v.bos, *rng.integers(0, 40, rng.integers(2, 12))]
        for _ in range(rng.integers(1, 3)):
            ids += [v.special("<break>"), *(rng.integers(0, 16, v.image_tokens) + v.image_offset)]
        ids = [*ids[:SEQ_LEN], v.eos][: SEQ_LEN + 1]
        weights = (rng.random(len(ids)) < 0.8).astype(np.float32)
        items.append(pad_item(ids, weights, SEQ_LEN, v.pad))
    return items


def module(tmp_path) -> CM3LeonModule:
    VOCAB.save(tmp_path / "vocab.json")
    model = ModelConfig.preset("debug", cell_embedding=True, copy_heads=2, copy_bias=8.0)
    m = CM3LeonModule(model=vars(model), vocab_path=str(tmp_path / "vocab.json"))
    torch.manual_seed(0)
    for p in m.net.parameters():  # the zero-initialised head would make every logit equal
        torch.nn.init.normal_(p, std=0.2)
    return m.eval()


def test_packing_fills_fewer_rows_with_every_token_and_weight():
    items = make_items(8)
    batch = PackedCollate(VOCAB.pad)(items)
    n_rows, width = batch["ids"].shape
    assert width == SEQ_LEN + 1 and n_rows < len(items)
    assert batch["weights"].shape == (n_rows, SEQ_LEN)
    lengths = sorted(int(it["length"]) for it in items)
    docs = batch["doc_ids"]
    found = sorted(
        int((docs[r] == d).sum()) for r in range(n_rows) for d in docs[r].unique() if d >= 0
    )
    assert found == lengths  # every sequence whole, in one row
    assert int((batch["ids"] != VOCAB.pad).sum()) == sum(lengths)
    total = sum(float(it["weights"].sum()) for it in items)
    assert float(batch["weights"].sum()) == total
    # each sequence's first token is never a target (its predecessor is another sequence)
    starts = batch["positions"][:, 1:] == 0
    assert float(batch["weights"][starts & (docs[:, 1:] >= 0)].sum()) == 0.0
    assert torch.equal(batch["length"], torch.stack([it["length"] for it in items]))


def test_packed_batch_gives_each_sequence_the_loss_of_its_own_padded_row(tmp_path):
    """With copy heads and cell embeddings (both look at earlier images), packed sequences
    neither see each other nor shift positions: the per-target losses are the padded ones."""
    m = module(tmp_path)
    items = make_items(8, seed=1)
    padded = torch.utils.data.default_collate(items)
    packed = PackedCollate(VOCAB.pad)(items)
    assert packed["ids"].shape[0] < padded["ids"].shape[0]
    losses = []
    with torch.no_grad():
        for batch in (padded, packed):
            ce, loss = m.batch_loss(batch, batch["weights"].sum())
            kept = ce[batch["weights"] > 0]
            losses.append((loss, torch.sort(kept).values))
    (loss_pad, ce_pad), (loss_pack, ce_pack) = losses
    assert ce_pad.numel() == ce_pack.numel() > 100
    assert float(ce_pad.std()) > 0.1  # a random network: the losses differ from token to token
    torch.testing.assert_close(ce_pack, ce_pad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss_pack, loss_pad, atol=1e-5, rtol=1e-5)


def test_without_the_mask_packed_sequences_would_see_each_other(tmp_path):
    """The check above can fail: the same packed rows with a plain causal mask change the
    losses of every sequence after the first in a row."""
    m = module(tmp_path)
    items = make_items(8, seed=1)
    packed = PackedCollate(VOCAB.pad)(items)
    with torch.no_grad():
        mask = attention_mask_from_doc_ids(packed["doc_ids"][:, :-1])
        masked = m.net(packed["ids"][:, :-1], positions=packed["positions"][:, :-1], attn_mask=mask)
        plain = m.net(packed["ids"][:, :-1], positions=packed["positions"][:, :-1])
    later = packed["doc_ids"][:, :-1] > 0
    assert later.any()
    assert (masked - plain).abs().amax(-1)[later].min() > 1e-3
    first = packed["doc_ids"][:, :-1] == 0
    torch.testing.assert_close(masked[first], plain[first], atol=1e-5, rtol=1e-5)


def test_per_task_validation_loss_is_the_same_packed_or_padded(tmp_path):
    """Each SFT item's task follows its tokens into the packed rows; the per-task validation
    loss (sums over the batches, then the mean per task) equals the mean of that task's target
    losses computed sequence by sequence, packed or not."""
    from lit_cm3leon.data.templates import TASKS

    m = module(tmp_path)
    items = make_items(8, seed=2)
    for i, it in enumerate(items):
        it["task"] = torch.tensor([1, 3, 8][i % 3])  # caption_long, vqa, spatial
    packed = PackedCollate(VOCAB.pad)(items)
    tt, docs = packed["token_task"], packed["doc_ids"]
    assert tt.shape == packed["ids"].shape and bool(((tt == -1) == (docs == -1)).all())
    expected = {}
    with torch.no_grad():
        for it in items:  # one sequence at a time, in its own padded row
            one = torch.utils.data.default_collate([it])
            ce, _ = m.batch_loss(one, one["weights"].sum())
            w = one["weights"] > 0
            expected.setdefault(TASKS[int(it["task"])], []).append(ce[w])
    expected = {k: float(torch.cat(v).mean()) for k, v in expected.items()}
    for batch in (packed, torch.utils.data.default_collate(items)):
        m.on_validation_epoch_start()
        with torch.no_grad():
            ce, _ = m.batch_loss(batch, batch["weights"].sum())
            m._log_task_losses(batch, ce, batch["weights"])
        sums = m._task_sums
        got = {TASKS[k]: float(sums[0, k] / sums[1, k]) for k in range(len(TASKS)) if sums[1, k]}
        assert got.keys() == expected.keys() == {"caption_long", "vqa", "spatial"}
        for k in got:
            assert abs(got[k] - expected[k]) < 1e-4, (k, got[k], expected[k])
