"""The perplexity evaluation's pieces: the unigram baseline and the own-document probe."""

import numpy as np

from lit_cm3leon.evaluation.perplexity import own_document_nll, unigram_nll


def test_unigram_nll_counts_codes_per_position():
    train = np.array([[[1, 2]], [[1, 2]], [[1, 3]]])  # [N, h=1, w=2]
    nll = unigram_nll(train, np.array([[[1, 2]], [[0, 3]]]), n_codes=4)
    # add-one smoothing: position 0 has counts (1, 4, 1, 1) / 7, position 1 (1, 1, 3, 2) / 7
    np.testing.assert_allclose(
        nll, [-(np.log(4 / 7) + np.log(3 / 7)) / 2, -(np.log(1 / 7) + np.log(2 / 7)) / 2]
    )


class CopyingEngine:
    """image_nll is 0 for an image whose retrieved documents include its own codes, else 1."""

    def __init__(self):
        self.retrieve_fn = self.bank = lambda texts, k: [
            [("other", np.zeros(4))] * k for _ in texts
        ]

    def image_nll(self, captions, codes, retrieve_k=0):
        docs = self.retrieve_fn(captions, retrieve_k) if retrieve_k else [[] for _ in captions]
        return np.array(
            [
                0.0 if any(np.array_equal(c, d[1]) for d in ds) else 1.0
                for c, ds in zip(codes, docs, strict=True)
            ]
        )


def test_own_document_probe_retrieves_each_image_itself_then_restores_the_retriever():
    engine = CopyingEngine()
    codes = np.arange(12).reshape(3, 4)
    captions = ["a", "b", "c"]
    assert engine.image_nll(captions, codes, retrieve_k=1).tolist() == [1.0, 1.0, 1.0]
    assert own_document_nll(engine, captions, codes).tolist() == [0.0, 0.0, 0.0]
    assert engine.retrieve_fn is engine.bank  # the bank's retriever is back


def test_copy_task_logs_both_images_losses(tmp_path):
    """eval/copy_task.py trains on "caption image caption image" sequences; at step 0 (nothing
    learned, zero output layer) both images cost log(vocabulary), then training lowers them."""
    import importlib.util
    import json
    import math

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("eval_copy_task", ROOT / "eval" / "copy_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    main = module.main
    out = tmp_path / "copy.json"
    assert main(["--preset", "debug", "--steps", "4", "--every", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    first, last = result["log"][0], result["log"][-1]
    assert [r["step"] for r in result["log"]] == [0, 4]
    assert abs(first["loss_repeat"] - first["loss_first"]) < 1e-3
    assert first["loss_repeat"] > math.log(64) and last["loss_repeat"] < first["loss_repeat"]


def test_image_nll_batches_rows_of_like_length_and_keeps_their_order(tmp_path):
    """Rows are batched by length (less padding); each image's NLL is the one it gets alone."""
    import torch

    from lit_cm3leon.engine import Engine
    from lit_cm3leon.model import ModelConfig, build_model
    from lit_cm3leon.tokenizer.codec import DocumentCodec
    from tests.fixtures import make_text_tokenizer

    codec = DocumentCodec.load(make_text_tokenizer(tmp_path, n_codes=16, hw=4))
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("debug").for_vocab(codec.vocab))
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # the paper's zero head scores all alike
    engine = Engine(model, codec, autocast=False)
    captions = ["a", "a red circle big", "b", "a red", "a red circle big square", "c"]
    codes = np.random.default_rng(0).integers(0, 16, (len(captions), 4, 4))
    alone = [
        engine.image_nll([c], codes[i : i + 1], batch_size=1)[0] for i, c in enumerate(captions)
    ]
    batched = engine.image_nll(captions, codes, batch_size=4)
    np.testing.assert_allclose(batched, alone, rtol=1e-5)
    assert len(set(np.round(alone, 6))) == len(captions)  # the rows' values differ: order matters
