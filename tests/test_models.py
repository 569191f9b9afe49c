"""Tests of the models (GPT, VAE, GAN, DiffusionModel, LatentDiffusion) and their demos on tiny configurations: the two backends
agree, the genkernels backend runs our custom ops, every model compiles into one graph, the GPT's
cached generation equals greedy decoding without a cache, training on the real data lowers the
losses and beats the baselines, sampling is reproducible, and checkpoints round-trip.

Training the GPT and the pixel-space DiffusionModel on the genkernels backend runs the backward
of our attention op."""

from __future__ import annotations

import math
import sys
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from genkernels.__main__ import main
from genkernels.demos import data
from genkernels.demos.gan import class_histogram
from genkernels.demos.png import image_grid, plot_lines, write_png
from genkernels.models import (
    BACKENDS, GAN, GPT, VAE, DiffusionConfig, DiffusionModel, GANConfig, GPTConfig, LatentDiffusion,
    LatentDiffusionConfig, VAEConfig, load_checkpoint, save_checkpoint,
)

TINY_GPT = GPTConfig(vocab_size=len(data.VOCAB), block_size=32, n_layer=1, n_head=2, d_model=32)
TINY_VAE = VAEConfig(image_size=8, latent_dim=4, hidden=64)
TINY_GAN = GANConfig(image_size=16, latent_dim=16, width=16)
TINY_DIFFUSION = DiffusionConfig(sample_shape=(1, 8, 8), channels=8, heads=2, num_train_timesteps=100)
TINY_LATENT = LatentDiffusionConfig(TINY_VAE, DiffusionConfig(sample_shape=(4,), channels=32, mlp_blocks=2, num_train_timesteps=100, clip_sample=4.0))
KINDS = ["gpt", "vae", "gan", "diffusion", "latent"]


def make(kind: str, backend: str, seed: int = 0):
    torch.manual_seed(seed)
    cls, config = {"gpt": (GPT, TINY_GPT), "vae": (VAE, TINY_VAE), "gan": (GAN, TINY_GAN), "diffusion": (DiffusionModel, TINY_DIFFUSION),
                   "latent": (LatentDiffusion, TINY_LATENT)}[kind]
    return cls(config, backend=backend)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models gain nothing from a second thread, and on a busy machine every parallel
    region of their many small ops waits for a descheduled thread (a 5x slowdown measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus() -> data.Corpus:
    return data.python_source_corpus()


@pytest.fixture(scope="module")
def digits() -> data.Digits:
    return data.load_digits()


def gpt_batch(tokens: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(tokens) - length - 1, (batch,), generator=generator)
    windows = torch.stack([tokens[s : s + length + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def outputs(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """Everything a model computes for fixed inputs and seeds."""
    g = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    if isinstance(model, GPT):
        idx = torch.randint(0, TINY_GPT.vocab_size, (2, 12), generator=g())
        prompts = [idx[0, :3], idx[1, :7]]
        return {
            "loss": model(idx[:, :-1], idx[:, 1:])[1],
            "generated": torch.cat(model.generate(prompts, 6, temperature=0.9, top_k=8, top_p=0.95, generator=g())),
        }
    if isinstance(model, VAE):
        x = torch.rand(5, 1, 8, 8, generator=g())
        return {"loss": model.loss(x, generator=g())[0], "sample": model.sample(4, g()), "reconstruct": model.reconstruct(x)}
    if isinstance(model, (DiffusionModel, LatentDiffusion)):
        x = torch.rand(5, 1, 8, 8, generator=g())  # in [0, 1]: the VAE's range, and within the U-Net's
        labels = torch.tensor([0, 3, 5, 7, 9])
        return {
            "loss": model.loss(x, labels, generator=g()),
            "sample": model.sample(3, labels[:3], guidance_scale=2.0, sampler="ddim", num_inference_steps=4, generator=g()),
            "ddpm": model.sample(2, None, sampler="ddpm", num_inference_steps=4, generator=g()),
            "dpm": model.sample(3, labels[:3], guidance_scale=2.0, sampler="dpm", num_inference_steps=5, generator=g()),
        }
    real = torch.rand(4, 1, 16, 16, generator=g()) * 2 - 1
    fake = model(model.noise(4, g()))
    return {"d_loss": model.discriminator_loss(real, fake), "g_loss": model.generator_loss(fake), "sample": model.sample(4, g())}


@pytest.mark.parametrize("kind", KINDS)
def test_backends_agree_for_same_weights_and_seeds(kind):
    fast, slow = make(kind, "genkernels"), make(kind, "torch")
    slow.load_state_dict(fast.state_dict())
    a, b = outputs(fast), outputs(slow)
    for key in a:
        if a[key].dtype == torch.long:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


class OpNamespaces(TorchDispatchMode):
    """Records the namespace of every op dispatched (aten, genkernels, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind, expected", [
    ("gpt", {"genkernels::add_positional_encoding", "genkernels::attention_forward", "genkernels::attention_kvcache",
             "genkernels::sinusoidal_encoding"}),
    ("vae", {"genkernels::reparameterize", "genkernels::gaussian_kl", "genkernels::normal"}),
    ("gan", {"genkernels::normal"}),
    ("diffusion", {"genkernels::sinusoidal_encoding", "genkernels::attention_forward", "genkernels::q_sample",
                   "genkernels::diffusion_step", "genkernels::normal"}),
    ("latent", {"genkernels::sinusoidal_encoding", "genkernels::reparameterize", "genkernels::q_sample",
                "genkernels::diffusion_step", "genkernels::normal"}),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_genkernels_backend_dispatches_to_custom_ops(kind, expected, backend):
    model = make(kind, backend)
    with OpNamespaces() as recorded:
        outputs(model)  # the GPT's ragged generation also encodes positions per row
    ours = {op for op in recorded.ops if op.startswith("genkernels::")}
    assert ours == (expected if backend == "genkernels" else set())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_compiles_to_one_graph(kind, backend):
    # aot_eager traces the whole forward and backward (with our ops' fake implementations)
    # as inductor does, without the minutes of C++ code generation on a 2-core machine.
    model = make(kind, backend)
    if kind == "gpt":
        idx = torch.randint(0, TINY_GPT.vocab_size, (2, 9))
        loss_fn, args = (lambda x, y: model(x, y)[1]), (idx[:, :-1], idx[:, 1:])
    elif kind == "vae":
        loss_fn, args = model.forward, (torch.rand(3, 1, 8, 8),)
    elif kind == "gan":
        loss_fn, args = (lambda z: model.generator_loss(model(z))), (torch.randn(3, TINY_GAN.latent_dim),)
    else:
        loss_fn, args = model.loss, (torch.rand(3, 1, 8, 8), torch.tensor([1, 2, 3]))
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    loss = compiled(*args)
    torch.manual_seed(1)
    expected = loss_fn(*args)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.grad is not None) and any(
        p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt_inference_compiles_to_one_graph(backend):
    model = make("gpt", backend).eval()
    idx = torch.randint(0, TINY_GPT.vocab_size, (2, 9))
    compiled = torch.compile(lambda x: model(x)[0], fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model(idx)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt_cached_generation_equals_greedy_decoding_without_cache(backend):
    model = make("gpt", backend).double().eval()
    prompts = [torch.randint(0, TINY_GPT.vocab_size, (n,)) for n in (3, 9, 1, 6)]
    ragged = model.generate(prompts, 10, temperature=0)
    for prompt, got in zip(prompts, ragged):
        seq = prompt
        for _ in range(10):  # recompute the whole sequence for every new token
            logits, _ = model(seq[None])
            seq = torch.cat([seq, logits[0, -1].argmax()[None]])
        assert torch.equal(got, seq)
    batch = torch.stack([p[:1].repeat(4) for p in prompts])  # equal lengths: the fused offset path
    uniform = model.generate(batch, 10, temperature=0)
    assert torch.equal(uniform, torch.stack(model.generate(list(batch), 10, temperature=0)))


def test_gpt_generate_checks_lengths():
    model = make("gpt", "genkernels")
    with pytest.raises(ValueError, match="block_size"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([torch.zeros(0, dtype=torch.long)], 3)


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_is_reproducible_from_a_seed(kind):
    model = make(kind, "genkernels").eval()  # batch norm's running statistics stay fixed
    first, again, other = outputs(model, seed=3), outputs(model, seed=3), outputs(model, seed=4)
    keys = {"gpt": ["generated"], "vae": ["sample"], "gan": ["sample"], "diffusion": ["sample", "ddpm"], "latent": ["sample", "ddpm"]}[kind]
    for key in keys:
        assert torch.equal(first[key], again[key])
        assert not torch.equal(first[key], other[key])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt_training_lowers_the_held_out_loss(backend, corpus):
    # Beating the bigram model takes the demo's minutes; a few seconds of training must at
    # least take the held-out loss well below the unigram entropy (what counting characters gives).
    torch.manual_seed(0)
    model = GPT(TINY_GPT, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    test_x, test_y = gpt_batch(corpus.test, 32, TINY_GPT.block_size, generator)
    losses = []
    for _ in range(120):
        _, loss = model(*gpt_batch(corpus.train, 16, TINY_GPT.block_size, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        bits = model(test_x, test_y)[1].item() / math.log(2)
    frequencies = torch.bincount(corpus.train, minlength=len(data.VOCAB)).double() / len(corpus.train)
    unigram = float(-(frequencies * frequencies.clamp_min(1e-30).log2()).sum())
    assert sum(losses[-10:]) / 10 < losses[0] - 1.5
    assert bits < unigram - 0.7, (bits, unigram)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vae_held_out_negative_elbo_falls_with_training(backend, digits):
    torch.manual_seed(0)
    model = VAE(TINY_VAE, backend=backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    held_out = []
    for _ in range(3):
        held_out.append(model.negative_elbo(digits.test_images, torch.Generator().manual_seed(0)))
        for _ in range(60):
            rows = torch.randint(0, len(digits.train_images), (64,), generator=generator)
            loss = model(digits.train_images[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    held_out.append(model.negative_elbo(digits.test_images, torch.Generator().manual_seed(0)))
    assert all(a > b for a, b in zip(held_out, held_out[1:])), held_out


@pytest.mark.parametrize("backend", BACKENDS)
def test_gan_trains_and_its_samples_cover_every_class(backend, digits):
    torch.manual_seed(0)
    model = GAN(TINY_GAN, backend=backend)
    images = torch.nn.functional.interpolate(digits.train_images, size=16, mode="bilinear") * 2 - 1
    g_opt = torch.optim.Adam(model.generator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(model.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    generator = torch.Generator().manual_seed(0)
    start = model.sample(256, torch.Generator().manual_seed(0))
    d_losses = []
    for _ in range(80):
        real = images[torch.randint(0, len(images), (32,), generator=generator)]
        fake = model(model.noise(32))
        d_loss = model.discriminator_loss(real, fake)
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        g_loss = model.generator_loss(fake)
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
        d_losses.append(d_loss.item())
    end = model.sample(256, torch.Generator().manual_seed(0))
    # The samples move towards the data: their mean image gets closer to the real mean image.
    distance = lambda x: (x.mean(0) - images.mean(0)).norm()  # noqa: E731
    assert distance(end) < 0.5 * distance(start)
    assert d_losses[-1] < 2 * math.log(2) + 0.5  # the discriminator is not losing outright
    # No mode collapse: after seconds of training a tiny GAN covers most classes (the demo's
    # full run is checked for all ten).
    histogram = class_histogram(model, data.DigitClassifier())
    assert sum(count > 0 for count in histogram) >= 8, histogram


@pytest.mark.parametrize("kind", ["diffusion", "latent"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_diffusion_training_lowers_the_held_out_loss(kind, backend, digits):
    model = make(kind, backend)
    scale = (lambda x: 2 * x - 1) if kind == "diffusion" else (lambda x: x)  # noqa: E731
    if kind == "latent":
        model.fit_latent_scale(digits.train_images)
    parameters = model.diffusion.parameters() if kind == "latent" else model.parameters()
    optimizer = torch.optim.Adam(parameters, lr=3e-3)
    generator = torch.Generator().manual_seed(0)

    def held_out() -> float:
        with torch.no_grad():
            return model.loss(scale(digits.test_images), digits.test_labels, torch.Generator().manual_seed(0)).item()

    before = held_out()
    for _ in range(30):
        rows = torch.randint(0, len(digits.train_images), (32,), generator=generator)
        loss = model.loss(scale(digits.train_images[rows]), digits.train_labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert held_out() < 0.8 * before


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoints_round_trip(kind, tmp_path):
    model = make(kind, "genkernels", seed=5)
    model.eval()
    path = tmp_path / f"{kind}.pt"
    save_checkpoint(model, path, step=7)
    loaded, extra = load_checkpoint(path, backend="torch")
    loaded.eval()
    assert type(loaded) is type(model) and loaded.config == model.config and loaded.backend == "torch"
    assert extra == {"step": 7}
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def test_demo_trains_resumes_and_writes_its_outputs(tmp_path, capsys):
    out = str(tmp_path)
    assert main(["demo", "vae", "--steps", "20", "--out", out]) == 0
    first = torch.load(tmp_path / "vae.pt", weights_only=True)
    assert first["step"] == 20 and len(first["history"]) == 20
    assert main(["demo", "vae", "--steps", "30", "--out", out, "--resume"]) == 0
    resumed = torch.load(tmp_path / "vae.pt", weights_only=True)
    assert resumed["step"] == 30 and resumed["history"][:20] == first["history"]
    assert "held-out negative ELBO" in capsys.readouterr().out
    for name in ("vae-loss", "vae-samples", "vae-reconstructions", "vae-interpolations"):
        assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_png_writer_round_trips_pixels(tmp_path):
    pixels = image_grid(torch.rand(5, 1, 8, 8), columns=3, scale=2)
    write_png(str(tmp_path / "grid.png"), pixels)
    raw = (tmp_path / "grid.png").read_bytes()
    idat = raw.index(b"IDAT")
    length = int.from_bytes(raw[idat - 4 : idat], "big")
    rows = zlib.decompress(raw[idat + 4 : idat + 4 + length])
    height, width = pixels.shape
    decoded = bytes(b for r in range(height) for b in rows[r * (width + 1) + 1 : (r + 1) * (width + 1)])
    assert decoded == pixels.tobytes()
    plot = plot_lines([([0, 1, 2], [3.0, 2.0, 1.5])])
    assert plot.shape == (360, 640, 3) and (plot != 255).any()


def test_corpus_and_bigram_baseline(corpus):
    assert set(corpus.train_files).isdisjoint(corpus.test_files) and len(corpus.test) > 100_000
    assert data.decode(data.encode("def f(x):\n\treturn x")) == "def f(x):\n    return x"
    bits = data.bigram_bits_per_char(corpus.train, corpus.test[:-1][:50_000], corpus.test[1:][:50_000])
    assert 2.0 < bits < math.log2(len(data.VOCAB))


def test_digits_without_scikit_learn_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"genkernels\[demo\]"):
        data.load_digits()


def test_latent_diffusion_demo_reports_every_sampler(tmp_path, capsys):
    out = str(tmp_path)
    assert main(["demo", "vae", "--steps", "20", "--out", out]) == 0
    assert main(["demo", "latent-diffusion", "--steps", "20", "--out", out]) == 0
    printed = capsys.readouterr().out
    for figure in ("DDIM 50 steps", "DDPM 100 steps", "DPM-Solver++ 20 steps", "class histogram of 200 unconditional"):
        assert figure in printed
    for name in ("latent-diffusion-loss", "latent-diffusion-samples-ddim", "latent-diffusion-samples-ddpm"):
        assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
