from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flexact import ConfigError
from flexact.backbones import TextCNN
from flexact.cli import build_cli, main
from flexact.datamodules import DatasetError, TextDataModule, Vocabulary, load_vectors, tokenize
from flexact.datamodules.text import VocabularyConsumer
from flexact.modules import FlexActClassifier
from flexact.tools.fake_data import (
    polarity_texts,
    write_review_polarity,
    write_sentence_polarity,
)

from .conftest import REPO
from .test_data_images import (  # noqa: F401 (fixtures)
    QUIET,
    _cli_error,
    dead_url,
    http_server,
    one_thread,
)

TEXTCNN = str(REPO / "configs" / "textcnn_mr.yaml")
SMALL = ["--model.init_args.backbone.init_args.embedding_dim", "16",
         "--model.init_args.backbone.init_args.num_filters", "8"]


def _texts(dm: TextDataModule, split: str) -> list[str]:
    records = dm._read("test" if split == "test" and dm.hparams.test_path else "main")
    return [records[i][0] for i in dm.split_indices[split]]


def test_tokenizer_lowercases_and_splits_punctuation() -> None:
    assert tokenize("Don't STOP, it's great!") == ["don't", "stop", ",", "it's", "great", "!"]
    assert tokenize("Hi there", lowercase=False) == ["Hi", "there"]
    assert tokenize("a-b c", pattern=r"[^ ]+") == ["a-b", "c"]


def test_vocabulary_orders_by_frequency_and_keeps_the_specials() -> None:
    vocab = Vocabulary.build([["b", "a", "b"], ["c", "a", "b"]], min_freq=2)
    assert vocab.itos == ["<pad>", "<unk>", "b", "a"]
    assert vocab.encode(["a", "zebra"]) == [3, 1]
    assert len(Vocabulary.build([["x", "y", "z"]], max_size=2)) == 4


def test_review_polarity_splits_are_stratified_and_bad_bytes_counted(tmp_path: Path) -> None:
    write_review_polarity(tmp_path, n_per_class=10, bad_bytes=True)
    dm = TextDataModule(data_dir=str(tmp_path), val_split=0.125, test_split=0.2, seed=1)
    assert dm.num_outputs == 2 and dm.label_names == ["neg", "pos"] and dm.num_features is None
    with pytest.warns(UserWarning, match=r"replaced 1 undecodable byte.*cv000_1000\.txt"):
        dm.setup("fit")
    assert dm.num_bad_bytes == 1
    sizes = {name: len(ds) for name, ds in dm.datasets.items()}
    assert sizes == {"train": 14, "val": 2, "test": 4}
    for split in ("train", "val", "test"):
        labels = dm.datasets[split].tensors[1]
        assert (labels == 0).sum() == (labels == 1).sum()  # stratified
    assert not set(dm.split_indices["test"]) & set(dm.split_indices["train"])
    x, y = next(iter(dm.train_dataloader()))
    longest = max(len(tokenize(t)) for t in _texts(dm, "train"))  # default max_length
    assert x.dtype == torch.int64 and x.shape == (14, longest) and y.shape == (14,)
    # the byte is replaced, the rest of the review is kept
    assert any(t.startswith("caf\ufffd ") for t in _texts(dm, "train") + _texts(dm, "val")
               + _texts(dm, "test"))


def test_sentence_polarity_reads_one_sentence_per_line(tmp_path: Path) -> None:
    write_sentence_polarity(tmp_path, n_per_class=6)
    dm = TextDataModule(data_dir=str(tmp_path), source="sentence_polarity", val_split=0.0,
                        test_split=0.5)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 6 and len(dm.datasets["test"]) == 6
    assert dm.datasets["val"] is dm.datasets["test"]  # val_split 0 validates on the test split


def test_checkpointed_vocabulary_must_match_the_rebuilt_one(tmp_path: Path) -> None:
    write_review_polarity(tmp_path, n_per_class=4)
    dm = TextDataModule(data_dir=str(tmp_path), test_split=0.25)
    dm.setup("fit")
    state = dm.state_dict()
    assert state["vocabulary"][:2] == ["<pad>", "<unk>"] and len(state["vocabulary"]) == len(
        dm.vocab)
    dm.load_state_dict(state)  # same vocabulary: fine
    swapped = list(reversed(state["vocabulary"]))
    with pytest.raises(DatasetError, match=r"checkpoint's vocabulary .* differs"):
        dm.load_state_dict({"vocabulary": swapped})


def test_k_folds_partition_the_corpus(tmp_path: Path) -> None:
    write_review_polarity(tmp_path, n_per_class=10)
    tests, seen = [], set()
    for fold in range(5):
        dm = TextDataModule(data_dir=str(tmp_path), num_folds=5, fold=fold, val_split=0.25)
        dm.setup("fit")
        parts = dm.split_indices
        assert len(parts["test"]) == 4 and len(parts["val"]) == 4 and len(parts["train"]) == 12
        assert not (set(parts["test"]) & set(parts["train"])) | (set(parts["val"])
                                                                & set(parts["train"]))
        assert sorted(dm.datasets["test"].tensors[1].tolist()) == [0, 0, 1, 1]
        tests.append(set(parts["test"]))
        seen |= set(parts["test"])
    assert seen == set(range(20)) and sum(map(len, tests)) == 20  # disjoint test folds
    other = TextDataModule(data_dir=str(tmp_path), num_folds=5, fold=0, seed=7)
    other.setup("fit")
    assert set(other.split_indices["test"]) != tests[0]


def _write_table(path: Path, rows: list[tuple[str, str]], delimiter: str = ",") -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["id", "review", "stars"])
        writer.writerows((i, text, label) for i, (text, label) in enumerate(rows))
    return path


def _corpus(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rows = [(t, "10") for t in polarity_texts("pos", n, seed)]
    return rows + [(t, "2") for t in polarity_texts("neg", n, seed)]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_user_tables_with_custom_fields_and_a_test_file(tmp_path: Path, fmt: str) -> None:
    train_rows = [*_corpus(8), ("a rare word once", "2")]
    test_rows = [("zebra great film", "10"), ("boring zebra", "2")]
    for name, rows in (("train", train_rows), ("test", test_rows)):
        path = tmp_path / f"{name}.{fmt}"
        if fmt == "jsonl":
            path.write_text("\n".join(json.dumps({"review": t, "stars": int(s)})
                                      for t, s in rows) + "\n\n")
        else:
            _write_table(path, rows, "," if fmt == "csv" else "\t")
    dm = TextDataModule(data_dir=str(tmp_path), source=fmt, path=f"train.{fmt}",
                        test_path=str(tmp_path / f"test.{fmt}"), text_field="review",
                        label_field="stars", min_freq=2, max_length=5, val_split=0.2)
    assert dm.label_names == ["2", "10"]  # integer labels sort numerically
    dm.setup("fit")
    assert len(dm.datasets["test"]) == 2 and len(dm.datasets["train"]) + len(
        dm.datasets["val"]) == 17
    vocab = dm.vocab
    assert vocab is not None and "zebra" not in vocab.stoi  # built on the training split only
    assert "rare" not in vocab.stoi  # seen once, min_freq 2
    test_x, test_y = dm.datasets["test"].tensors
    assert test_x.shape == (2, 5) and test_y.tolist() == [1, 0]
    assert test_x[0, 0] == vocab.unk_index and test_x[1].tolist()[2:] == [0, 0, 0]
    assert dm.vocab_size == len(vocab)


def test_folder_corpus_with_fixed_label_order(tmp_path: Path) -> None:
    for label, n in (("sports", 4), ("arts", 4), ("tech", 4)):
        (tmp_path / "corpus" / label).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "corpus" / label / f"{i}.txt").write_text(f"{label} text number {i}")
    (tmp_path / "corpus" / "arts" / ".hidden").write_text("ignored")
    dm = TextDataModule(data_dir=str(tmp_path), source="folder", path="corpus",
                        labels=["tech", "sports", "arts"], test_split=0.25, val_split=0.0)
    assert dm.num_outputs == 3
    dm.setup("fit")
    assert sum(len(ds) for ds in (dm.datasets["train"], dm.datasets["test"])) == 12
    first = dm.vocab.stoi["tech"]
    x, y = dm.datasets["train"].tensors
    assert all((row[0] == first) == (label == 0) for row, label in zip(x, y, strict=True))
    wrong = TextDataModule(data_dir=str(tmp_path), source="folder", path="corpus",
                           labels=["tech", "sports"])
    with pytest.raises(DatasetError, match=r"label 'arts' is not among data\.labels"):
        wrong.setup("fit")


def test_pretrained_vectors_from_glove_and_word2vec_text(tmp_path: Path) -> None:
    vocab = Vocabulary(["movie", "great", "dull"])
    glove = tmp_path / "glove.txt"
    glove.write_text("movie 1 2 3\nGreat 4 5 6\ngreat 7 8 9\nbroken 1 2\nother 0 0 0\n")
    vectors, found = load_vectors(glove, vocab)
    assert vectors.shape == (5, 3) and found == 2
    assert vectors[vocab.stoi["movie"]].tolist() == [1, 2, 3]
    assert vectors[vocab.stoi["great"]].tolist() == [7, 8, 9]  # exact match beats "Great"
    assert vectors[0].abs().sum() == 0 and vectors[vocab.stoi["dull"]].abs().max() <= 0.25
    word2vec = tmp_path / "w2v.txt"
    word2vec.write_text("2 2\nDull 0.5 0.5\nmovie 1 1\n")
    vectors, found = load_vectors(word2vec, vocab)
    assert found == 2 and vectors[vocab.stoi["dull"]].tolist() == [0.5, 0.5]
    with pytest.raises(DatasetError, match="binary word2vec"):
        load_vectors(tmp_path / "GoogleNews-vectors-negative300.bin", vocab)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DatasetError, match="holds no word vectors"):
        load_vectors(empty, vocab)


def test_cli_puts_pretrained_vectors_into_a_frozen_text_cnn(tmp_path: Path) -> None:
    write_review_polarity(tmp_path / "data", n_per_class=6)
    words = sorted({w for label in ("neg", "pos") for t in polarity_texts(label, 6)
                    for w in tokenize(t)})
    rows = {w: [float(i), 1.0, -1.0, 0.5] for i, w in enumerate(words)}
    (tmp_path / "vectors.txt").write_text(
        "".join(f"{w} {' '.join(map(str, v))}\n" for w, v in rows.items()))
    cli = build_cli(["fit", "--config", TEXTCNN, *QUIET, *SMALL,
                     "--model.init_args.backbone.init_args.embedding_dim", "4",
                     "--model.init_args.backbone.init_args.freeze_embedding", "true",
                     "--data.data_dir", str(tmp_path / "data"), "--data.download", "false",
                     "--data.vectors_path", str(tmp_path / "vectors.txt"),
                     "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(tmp_path)])
    backbone = cli.model.backbone
    vocab = cli.datamodule.vocab
    assert isinstance(backbone, TextCNN) and backbone.vocab_size == len(vocab)
    for word, index in vocab.stoi.items():  # every training word has its file vector
        if word not in ("<pad>", "<unk>"):
            assert backbone.embedding.weight[index].tolist() == rows[word]
    assert not backbone.embedding.weight.requires_grad
    optimizer = cli.trainer.optimizers[0]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(backbone.convs[0].weight) in optimized


def test_the_text_package_keeps_every_public_name_and_the_class_path() -> None:
    import flexact.datamodules
    import flexact.datamodules.text as text

    assert text.TextDataModule is flexact.datamodules.TextDataModule  # configs name either path
    for name in text.__all__:
        assert getattr(text, name) is not None
    assert {"DEFAULT_TOKEN_PATTERN", "POLARITY_URLS", "TextDataModule", "Vocabulary",
            "load_vectors", "tokenize"} <= set(text.__all__)
    assert text.tokenize is tokenize and callable(text.tokenize)


def test_setup_hands_the_vocabulary_to_the_backbone_only(tmp_path: Path) -> None:
    write_review_polarity(tmp_path, n_per_class=4)
    elsewhere = TextCNN(embedding_dim=4, num_filters=2)
    model = torch.nn.Module()
    model.backbone = TextCNN(embedding_dim=4, num_filters=2)
    model.elsewhere = elsewhere  # a set_vocabulary off the backbone is not looked for
    dm = TextDataModule(data_dir=str(tmp_path), test_split=0.25)
    dm.trainer = SimpleNamespace(lightning_module=model)  # type: ignore[assignment]
    dm.setup("fit")
    assert isinstance(model.backbone, VocabularyConsumer)
    assert dm.vocab_size is not None and model.backbone.vocab_size == dm.vocab_size
    assert dm.vectors is None and elsewhere.vocab_size is None
    dm.setup("test")  # a second setup keeps the embedding
    assert model.backbone.vocab_size == dm.vocab_size


def test_unused_vectors_are_a_warning(tmp_path: Path) -> None:
    write_review_polarity(tmp_path, n_per_class=4)
    (tmp_path / "vectors.txt").write_text("movie 1 2\n")
    model = torch.nn.Module()
    model.backbone = torch.nn.Identity()
    dm = TextDataModule(data_dir=str(tmp_path), test_split=0.25, vectors_path="vectors.txt")
    dm.trainer = SimpleNamespace(lightning_module=model)  # type: ignore[assignment]
    with pytest.warns(UserWarning, match=r"backbone \(Identity\) has no set_vocabulary"):
        dm.setup("fit")
    assert dm.vectors is not None and dm.vectors.shape == (dm.vocab_size, 2)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"vocab_size": 0}, "vocab_size"), ({"embedding_dim": -3}, "embedding_dim"),
    ({"num_filters": 0}, "num_filters"), ({"num_filters": 2.5}, "num_filters"),
])
def test_text_cnn_sizes_must_be_positive_ints(kwargs: dict, name: str) -> None:
    with pytest.raises(ConfigError, match=rf"TextCNN's {name} must be a positive int"):
        TextCNN(**kwargs)
    with pytest.raises(ConfigError, match="vocab_size must be a positive int"):
        TextCNN(embedding_dim=4, num_filters=2).set_vocabulary(0)


@pytest.mark.usefixtures("one_thread")
def test_textcnn_learns_through_the_text_loaders_and_reloads_from_its_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_review_polarity(tmp_path / "data", n_per_class=40)
    common = ["--config", TEXTCNN, *QUIET, *SMALL, "--data.data_dir", str(tmp_path / "data"),
              "--data.download", "false", "--data.batch_size", "8", "--data.max_length", "40",
              "--trainer.default_root_dir", str(tmp_path / "runs")]
    # Kim's Adadelta needs hundreds of steps; Adam learns this tiny set in ~60
    adam = ["--model.init_args.optimizer", "torch.optim.Adam",
            "--model.init_args.optimizer.init_args.lr", "0.01",
            "--model.init_args.backbone.init_args.num_filters", "16"]
    cli = build_cli(["fit", *common, *adam, "--trainer.max_epochs", "8"])
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    tested = build_cli(["test", *common, "--ckpt_path", ckpt])
    assert tested.trainer.callback_metrics["test_acc"] > 0.8  # chance is 0.5
    reloaded = FlexActClassifier.load_from_checkpoint(ckpt)
    assert torch.equal(reloaded.backbone.embedding.weight.cpu(),
                       cli.model.backbone.embedding.weight.cpu())
    # another vocabulary than the checkpoint's: one clear line, not a size-mismatch traceback
    line = _cli_error(["test", *common, "--data.max_vocab_size", "5", "--ckpt_path", ckpt],
                      capsys)
    assert "checkpoint's embedding has" in line and "same data" in line


# --------------------------------------------------------------------------- downloads, errors
def test_sentence_polarity_download_from_a_local_server(
    tmp_path: Path, http_server: tuple[str, Path]  # noqa: F811
) -> None:
    base, served = http_server
    write_sentence_polarity(tmp_path / "src", n_per_class=5)
    with tarfile.open(served / "rt-polaritydata.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "rt-polaritydata", arcname="rt-polaritydata")
    dm = TextDataModule(data_dir=str(tmp_path / "data"), source="sentence_polarity",
                        download=True, url=base + "rt-polaritydata.tar.gz", test_split=0.2)
    dm.prepare_data()
    assert (tmp_path / "data" / "rt-polaritydata" / "rt-polarity.neg").is_file()
    dm.setup("fit")
    assert sum(len(dm.datasets[s]) for s in ("train", "val", "test")) == 10
    # an archive without the expected files is a clear error
    (served / "other.tar.gz").write_bytes((served / "rt-polaritydata.tar.gz").read_bytes())
    wrong = TextDataModule(data_dir=str(tmp_path / "w"), download=True,
                           url=base + "other.tar.gz")
    with pytest.raises(DatasetError, match=r"does not contain .*txt_sentoken"):
        wrong.prepare_data()


def test_review_polarity_download_through_the_cli(
    tmp_path: Path, http_server: tuple[str, Path]  # noqa: F811
) -> None:
    base, served = http_server
    write_review_polarity(tmp_path / "src", n_per_class=5)
    with tarfile.open(served / "review_polarity.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "txt_sentoken", arcname="txt_sentoken")
    cli = build_cli(["fit", "--config", TEXTCNN, *QUIET, *SMALL,
                     "--data.data_dir", str(tmp_path / "data"), "--data.download", "true",
                     "--data.url", base + "review_polarity.tar.gz",
                     "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.state.finished and cli.datamodule.vocab_size > 10


def test_corrupt_archive_and_no_network_are_one_clear_line(
    tmp_path: Path, http_server: tuple[str, Path], dead_url: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, served = http_server
    (served / "review_polarity.tar.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    args = ["fit", "--config", TEXTCNN, *QUIET, "--data.download", "true",
            "--trainer.default_root_dir", str(tmp_path)]
    line = _cli_error([*args, "--data.data_dir", str(tmp_path / "a"),
                       "--data.url", base + "review_polarity.tar.gz"], capsys)
    assert "review_polarity.tar.gz is truncated or corrupt" in line and "delete it" in line
    line = _cli_error([*args, "--data.data_dir", str(tmp_path / "b"),
                       "--data.url", dead_url + "review_polarity.tar.gz"], capsys)
    assert "could not download" in line and "network" in line


def test_missing_text_data_is_one_clear_line(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    line = _cli_error(["fit", "--config", TEXTCNN, *QUIET, "--data.data_dir", str(tmp_path),
                       "--data.download", "false", "--trainer.default_root_dir",
                       str(tmp_path)], capsys)
    assert "review polarity data not found" in line and str(tmp_path / "txt_sentoken") in line
    assert "data.download true" in line


def test_malformed_user_files_are_clear_errors(tmp_path: Path) -> None:
    table = _write_table(tmp_path / "data.csv", _corpus(3))
    with pytest.raises(DatasetError, match=r"no column 'text' \(its header is \['id', 'review'"):
        TextDataModule(data_dir=str(tmp_path), source="csv", path="data.csv").setup("fit")
    assert table.is_file()
    lines = tmp_path / "data.jsonl"
    lines.write_text('{"text": "fine", "label": "pos"}\n{"text": "oops", "label": \n')
    with pytest.raises(DatasetError, match=r"data.jsonl, line 2: not valid JSON"):
        TextDataModule(data_dir=str(tmp_path), source="jsonl", path="data.jsonl").setup("fit")
    lines.write_text('{"body": "fine", "label": "pos"}\n')
    with pytest.raises(DatasetError, match=r"line 1: expected an object with 'text'"):
        TextDataModule(data_dir=str(tmp_path), source="jsonl", path="data.jsonl").setup("fit")
    with pytest.raises(DatasetError, match=r"missing\.csv not found"):
        TextDataModule(data_dir=str(tmp_path), source="csv", path="missing.csv").num_outputs  # noqa: B018


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"source": "csv", "path": "x.csv", "download": True}, "fetches only the polarity"),
    ({"source": "csv"}, "needs data.path"),
    ({"path": "x"}, "official layout"),
    ({"token_pattern": "("}, "not a valid regular expression"),
    ({"encoding": "klingon"}, "unknown text encoding"),
    ({"num_folds": 1}, "num_folds must be >= 2"),
    ({"num_folds": 5, "fold": 5}, r"fold must lie in \[0, 5\)"),
    ({"val_split": 1.0}, "val_split"),
    ({"labels": ["pos"]}, "at least two"),
])
def test_bad_text_arguments_are_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TextDataModule(**kwargs)


def test_cli_help_shows_the_text_docstrings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--data.help", "TextDataModule"])
    out = capsys.readouterr().out
    assert "Which fold is the test set" in out and "word2vec/GloVe" in out


def test_cue_purity_mixes_in_sentiment_words_of_the_other_polarity(tmp_path: Path) -> None:
    from flexact.tools.fake_data import _NEGATIVE, _POSITIVE

    def cues(texts: list[str]) -> tuple[int, int]:
        words = [w.lower() for t in texts for w in t.split()]
        return sum(w in _POSITIVE for w in words), sum(w in _NEGATIVE for w in words)

    pure, mixed = polarity_texts("pos", 200), polarity_texts("pos", 200, cue_purity=0.7)
    positive, negative = cues(pure)  # up to three sentiment words each (places may coincide)
    assert negative == 0 and positive > 500
    positive, negative = cues(mixed)
    assert positive + negative > 500 and 0.6 < positive / (positive + negative) < 0.8
    folder = write_review_polarity(tmp_path, n_per_class=4, length=30, cue_purity=0.7)
    text = (folder / "neg" / "cv000_1000.txt").read_text()
    assert len(text.split()) == 31  # 30 words and the final "."
    with pytest.raises(ValueError, match="cue_purity"):
        polarity_texts("pos", 1, cue_purity=0.2)
