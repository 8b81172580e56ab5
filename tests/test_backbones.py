from __future__ import annotations

import pytest
import torch
from torch import nn

from flexact import ConfigError, FlexAct, flexact_layers, selection_kl
from flexact.backbones import MLP, CifarResNet, LeNet5, TextCNN, cifar_resnet18, cifar_resnet34
from flexact.modules import FlexActClassifier
from flexact.nn.activations import AdaptiveGumbel


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("activation", ["relu", "adaptive_gumbel", "flexact", "flexact_channel"])
@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda a: LeNet5(activation=a), (2, 1, 28, 28)),
        (lambda a: LeNet5(in_channels=3, image_size=32, hidden_features=None, activation=a),
         (2, 3, 32, 32)),
        (lambda a: MLP(784, [32, 16], activation=a, batch_norm=True, dropout=0.1),
         (2, 1, 28, 28)),
        (lambda a: TextCNN(vocab_size=30, embedding_dim=8, num_filters=4, activation=a), (2, 9)),
    ],
    ids=["lenet5", "lenet5-cifar-nohidden", "mlp", "textcnn"],
)
def test_backbone_output_matches_out_features(make, shape, activation: str) -> None:
    model = make(activation)
    x = torch.randint(0, 30, shape) if len(shape) == 2 else torch.randn(shape)
    out = model(x)
    assert out.shape == (2, model.out_features)
    assert isinstance(model.out_features, int)
    if activation.startswith("flexact"):
        assert _count(model, FlexAct) > 0
        assert _count(model, nn.ReLU) == _count(model, FlexAct)  # only as a candidate
        out.sum().backward()
        assert all(layer.logits.grad is not None for _, layer in flexact_layers(model))
    if activation == "adaptive_gumbel":
        assert _count(model, AdaptiveGumbel) > 0


def test_cifar_resnet_has_the_cifar_stem_and_one_activation_per_site() -> None:
    r18 = CifarResNet(depth=18, activation="flexact")
    assert r18.conv1.kernel_size == (3, 3) and r18.conv1.stride == (1, 1)
    assert isinstance(r18.maxpool, nn.Identity) and isinstance(r18.fc, nn.Identity)
    # stem + two sites in each of the 8 basic blocks, each its own layer
    assert len(list(flexact_layers(r18))) == 1 + 2 * 8
    assert r18(torch.randn(2, 3, 32, 32)).shape == (2, 512) == (2, r18.out_features)
    r34 = cifar_resnet34()
    assert _count(r34, nn.ReLU) == 1 + 2 * 16
    # torchvision's resnet18 minus its 1000-way fc, with the smaller stem (3·3·3·64 vs 3·7·7·64)
    n18 = sum(p.numel() for p in cifar_resnet18().parameters())
    assert n18 == 11_689_512 - 513_000 - 3 * 64 * (49 - 9)
    assert sum(p.numel() for p in r34.parameters()) > 21_000_000


def test_flexact_channel_keeps_one_selection_per_channel() -> None:
    model = CifarResNet(activation="flexact_channel")
    stem = model.relu
    assert isinstance(stem, FlexAct) and stem.logits.shape == (64, 5)
    last = model.layer4[-1].act2
    assert last.logits.shape == (512, 5)


def test_activation_kwargs_reach_the_activation() -> None:
    model = LeNet5(activation="leaky_relu", activation_kwargs={"negative_slope": 0.2})
    assert model.features[1].negative_slope == 0.2
    model = MLP(4, [3], activation="flexact", activation_kwargs={"candidates": ["relu", "tanh"]})
    (_, layer), = flexact_layers(model)
    assert layer.candidate_names == ("relu", "tanh")


@pytest.mark.parametrize("make", [
    lambda: CifarResNet(activation="swishy"),
    lambda: LeNet5(activation="swishy"),
    lambda: MLP(3, activation="swishy"),
    lambda: TextCNN(activation="swishy"),
])
def test_unknown_activation_lists_the_valid_names(make) -> None:
    with pytest.raises(ConfigError, match=r"unknown activation 'swishy'.*relu.*flexact_channel"):
        make()


@pytest.mark.parametrize(("make", "message"), [
    (lambda: LeNet5(image_size=8), "too small"),
    (lambda: LeNet5(channels=[3]), "two positive ints"),
    (lambda: MLP(4, hidden=[0]), "positive"),
    (lambda: TextCNN(filter_sizes=[]), "filter_sizes"),
    (lambda: TextCNN(dropout=1.0), "dropout"),
    (lambda: CifarResNet(depth=50), "18 or 34"),
])
def test_bad_backbone_arguments_are_config_errors(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_text_cnn_builds_its_embedding_lazily_and_once() -> None:
    model = TextCNN(embedding_dim=6, num_filters=3, filter_sizes=[2, 5])
    with pytest.raises(RuntimeError, match="no embedding"):
        model(torch.zeros(1, 4, dtype=torch.long))
    vectors = torch.randn(10, 6)
    model.set_vocabulary(10, vectors)
    assert model.vocab_size == 10
    assert torch.equal(model.embedding.weight[1:], vectors[1:])
    assert torch.count_nonzero(model.embedding.weight[0]) == 0  # <pad> row
    # shorter than the widest filter: padded, not an error
    assert model(torch.tensor([[3, 4]])).shape == (1, 6)
    with torch.no_grad():
        model.embedding.weight.add_(1.0)
    trained = model.embedding.weight.clone()
    model.set_vocabulary(10)  # a second setup (e.g. test after fit) keeps the trained vectors
    assert torch.equal(model.embedding.weight, trained)
    with pytest.raises(ConfigError, match="vocabulary has 11"):
        model.set_vocabulary(11)
    with pytest.raises(ConfigError, match="embedding_dim to 4"):
        TextCNN(embedding_dim=6).set_vocabulary(10, torch.randn(10, 4))


def test_text_cnn_state_dict_round_trip_builds_the_embedding() -> None:
    model = TextCNN(vocab_size=12, embedding_dim=5, num_filters=2, freeze_embedding=True)
    assert not model.embedding.weight.requires_grad
    fresh = TextCNN(embedding_dim=5, num_filters=2, freeze_embedding=True)
    fresh.load_state_dict(model.state_dict())  # strict: no unexpected keys
    assert fresh.vocab_size == 12
    assert torch.equal(fresh.embedding.weight, model.embedding.weight)
    assert not fresh.embedding.weight.requires_grad
    other = TextCNN(vocab_size=13, embedding_dim=5, num_filters=2)
    with pytest.raises(ConfigError, match="checkpoint's embedding has 12 tokens"):
        other.load_state_dict(model.state_dict())


@pytest.mark.parametrize("backbone", [
    LeNet5(hidden_features=64, activation="flexact"),
    MLP(784, [32]),
])
def test_flexact_classifier_reads_out_features_and_regularizes_backbone_sites(backbone) -> None:
    model = FlexActClassifier(backbone=backbone, num_outputs=10, hidden_features=16)
    assert model.head.linear.in_features == backbone.out_features
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    model.train()
    loss = nn.functional.cross_entropy(model(x), y) + selection_kl(model)
    loss.backward()
    layers = dict(flexact_layers(model.model))
    assert "head.flexact" in layers
    if isinstance(backbone, LeNet5):
        assert len(layers) == 4  # two conv sites, the hidden FC site, the head
        assert all(layer.logits.grad is not None for layer in layers.values())
