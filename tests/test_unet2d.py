"""2D models: structure per METHOD §2, any K and slice size, serialization, inference
view, long-range context, subnetwork pretraining."""

import keras
import numpy as np
import pytest

from brats_tf.models.unet2d import (build_2d_model, build_2d_model_1, build_subnetwork_model,
                             inference_model, load_subnetwork_weights, output_names,
                             pooling_factor)
from brats_tf.models.unet2d import resolve_filters

TWO = ("flair", "t1c")


def predict(model, x):
    outputs = model(x, training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [np.asarray(o) for o in outputs]


def random_image(k, h=32, w=48, seed=0):
    return np.random.default_rng(seed).normal(size=(2, h, w, k)).astype(np.float32)


@pytest.mark.parametrize("kind", ["model1", "model2", "unet_axial"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_outputs_for_any_k_and_slice_size(kind, k):
    modalities = ("t1", "t1c", "t2", "flair")[:k]
    model = build_2d_model(kind, modalities)
    expected = ["main"] if kind == "unet_axial" else (
        ["main"] + [f"aux_{m}" for m in modalities] + ["aux_all"])
    assert model.output_names == expected == output_names(kind, modalities)
    outputs = predict(model, random_image(k))  # 32 x 48: non-square multiples of 8
    assert [o.shape for o in outputs] == [(2, 32, 48, 4)] * len(expected)


def test_pooling_factor_follows_the_sizes():
    assert pooling_factor("model1", "small") == 8
    assert pooling_factor("model1", "paper") == 16
    assert pooling_factor("model1", "small", sub_depth=4) == 16
    assert pooling_factor("model2", "small", sub_depth=4) == 8
    assert pooling_factor("unet_axial", "small", main_filters=(8, 8)) == 2
    assert resolve_filters("paper").main_filters == (64, 128, 256, 512, 512)


def test_bn_on_every_conv_except_classification_layers_and_bilinear_upsampling():
    model = build_2d_model_1(TWO)
    names = {layer.name for layer in model.layers}
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    classifiers = [c for c in convs if c.name == "main" or c.name.startswith("aux_")]
    assert sorted(c.name for c in classifiers) == ["aux_all", "aux_flair", "aux_t1c", "main"]
    for conv in convs:
        if conv in classifiers:
            assert conv.filters == 4 and conv.kernel_size == (1, 1) and conv.use_bias
        else:
            assert not conv.use_bias and conv.name.endswith(".conv")
            assert conv.name[:-len(".conv")] + ".bn" in names
    ups = [layer for layer in model.layers if isinstance(layer, keras.layers.UpSampling2D)]
    assert ups and all(u.interpolation == "bilinear" for u in ups)
    assert any(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers)
    # main network input = concatenation of the K+1 subnetworks' last layers
    filters = resolve_filters("small")
    assert model.get_layer("main.input").output.shape[-1] == 3 * filters.sub_filters


@pytest.mark.parametrize("kind", ["model1", "model2"])
def test_each_modality_subnetwork_sees_only_its_channel(kind):
    model = build_2d_model(kind, TWO)
    x = random_image(2)
    changed = x.copy()
    changed[..., 1] += 3.0  # perturb t1c only
    before, after = predict(model, x), predict(model, changed)
    differs = {name: not np.allclose(b, a) for name, b, a in
               zip(model.output_names, before, after)}
    assert differs == {"main": True, "aux_flair": False, "aux_t1c": True, "aux_all": True}


def test_save_load_gives_identical_outputs(tmp_path):
    model = build_2d_model_1(TWO)
    x = random_image(2)
    # give BN non-trivial statistics so that their round trip is tested too
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.random.default_rng(1).normal(
                size=layer.moving_mean.shape).astype(np.float32))
    path = tmp_path / "model1.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert restored.output_names == model.output_names
    for a, b in zip(predict(model, x), predict(restored, x)):
        np.testing.assert_array_equal(a, b)


def test_inference_model_returns_main_logits():
    model = build_2d_model_1(TWO)
    x = random_image(2)
    main_only = predict(inference_model(model), x)
    assert len(main_only) == 1
    np.testing.assert_array_equal(main_only[0], predict(model, x)[0])
    assert not np.allclose(main_only[0].sum(-1), 1.0)  # logits, not probabilities


def test_center_output_depends_on_a_distant_corner():
    keras.utils.set_random_seed(0)
    model = inference_model(build_2d_model_1(TWO))
    x = random_image(2, 64, 64)
    changed = x.copy()
    changed[:, :4, :4, :] += 5.0  # top-left corner, ~40 pixels from the center
    center = (slice(None), 32, 32)
    delta = np.abs(predict(model, changed)[0][center] - predict(model, x)[0][center])
    # pixels outside the receptive field give bit-identical outputs (see below), so
    # any change above float32 noise is a real dependence
    assert delta.max() > 1e-6
    # a tiny model without that context would not see it: the 2-level U-Net's
    # receptive field is too small, which shows the check can fail
    near = inference_model(build_2d_model_1(TWO, main_filters=(4, 4), sub_depth=0))
    delta_near = np.abs(predict(near, changed)[0][center] - predict(near, x)[0][center])
    assert delta_near.max() == 0.0


def _randomize(model, seed):
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) * 0.1 + 0.5
                       for w in model.get_weights()])


@pytest.mark.parametrize("modality", ["t1c", "all"])
def test_pretrained_subnetwork_weights_land_in_exactly_its_layers(modality):
    full = build_2d_model_1(TWO)
    sub = build_subnetwork_model(modality, TWO)
    _randomize(sub, seed=3)
    before = {layer.name: layer.get_weights() for layer in full.layers}
    copied = load_subnetwork_weights(full, sub)

    expected = {layer.name for layer in sub.layers if layer.weights}
    assert set(copied) == expected
    assert all(n.startswith(f"sub_{modality}.") or n == f"aux_{modality}" for n in copied)
    for layer in full.layers:
        now = layer.get_weights()
        if layer.name in expected:
            for a, b in zip(now, sub.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(a, b)
        else:
            for a, b in zip(now, before[layer.name]):
                np.testing.assert_array_equal(a, b)
    # functionally: the full model's auxiliary head now reproduces the subnetwork
    x = random_image(2)
    sub_input = x if modality == "all" else x[..., TWO.index(modality):][..., :1]
    aux_index = full.output_names.index(f"aux_{modality}")
    np.testing.assert_allclose(predict(full, x)[aux_index], predict(sub, sub_input)[0],
                               rtol=1e-5, atol=1e-5)


def test_subnetwork_for_another_model_is_refused():
    full = build_2d_model_1(TWO)
    with pytest.raises(ValueError):
        load_subnetwork_weights(full, build_subnetwork_model("t1c", TWO, sub_filters=4))
    with pytest.raises(ValueError):
        build_subnetwork_model("t2", TWO)


def test_small_preset_trains_with_the_deep_supervision_loss():
    from brats_tf.training.losses import deep_supervision_losses
    from brats_tf.training.optim import NormalizedMomentum
    keras.utils.set_random_seed(0)
    model = build_2d_model_1(TWO, sub_filters=4, main_filters=(8, 8))  # fast to trace
    losses, weights = deep_supervision_losses(model.output_names)
    model.compile(optimizer=NormalizedMomentum(learning_rate=0.05, accumulation_steps=1),
                  loss=losses, loss_weights=weights)
    model.optimizer.build(model.trainable_variables)  # eagerly: faster than in the trace
    x = random_image(2, 32, 32)
    labels = (x[..., 0] > 0.5).astype(np.int32) + (x[..., 1] > 1.0).astype(np.int32) * 2
    targets = {n: labels for n in model.output_names}
    losses = [model.train_on_batch(x, targets, return_dict=True)["loss"] for _ in range(6)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
