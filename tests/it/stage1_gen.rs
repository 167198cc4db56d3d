//! Stage-1 generator step against the reference (bytetriper/RAE
//! `train_stage1.py`, `stage1/rae.py`, `disc/lpips.py`), fixtures made by
//! `scripts/make_stage1_fixtures.py` in tests/fixtures/rae-ref/stage1-gen/ (see its
//! README): LPIPS (value, taps, input gradient), the noisy latent, L1,
//! LPIPS, total, every decoder gradient, one AdamW step and the EMA, the
//! adaptive GAN weight through the adversarial seam, the lr schedule.

use crate::common::{max_abs, max_abs_diff};

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use rae_cache::models::{DecoderConfig, WeightsKey, load_state_dict};
use rae_cache::stage1::generator::{GeneratorConfig, POS_EMBED};
use rae_cache::stage1::lpips::LpipsSource;
use rae_cache::stage1::{GenBatch, GenLossConfig, GeneratorState, Lpips, NoiseAug, NoiseDraws};
use rae_cache::train::{AdamWConfig, LrSchedule, ScheduleKind};

/// `stage1-gen/` of the reference fixtures (`$RAE_REF_FIXTURES`, e.g. a
/// perturbed copy; default the repo's).
fn dir() -> PathBuf {
    crate::common::fixture("stage1-gen")
}

fn spec() -> serde_json::Value {
    let p = dir().join("stage1.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn io(name: &str) -> HashMap<String, Tensor> {
    let p = dir().join(name);
    candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn first(t: &Tensor) -> f64 {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64
}

fn num(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("stage1.json: {k} is not a number"))
}

/// max |got - want| <= 1e-4 * max |want| (a reference below 1e-5, e.g. a
/// gradient that is zero in exact arithmetic, must be matched to 1e-9);
/// returns the relative error (0 for such a reference).
fn close(got: &Tensor, want: &Tensor, what: &str) -> f32 {
    let finite = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite())
    };
    assert!(finite(got) && finite(want), "{what}: not finite");
    let scale = max_abs(want);
    let err = max_abs_diff(got, want);
    let rel = if scale >= 1e-5 { err / scale } else { 0.0 };
    assert!(
        err <= 1e-4 * scale.max(1e-5),
        "{what}: max abs err {err:.3e}, reference max {scale:.3e}"
    );
    rel
}

fn close_scalar(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-4 * want.abs().max(1e-6),
        "{what}: {got} vs reference {want}"
    );
}

fn lpips() -> Lpips {
    let s = spec();
    let d = dir();
    Lpips::load(
        &d.join(s["lpips"]["vgg"].as_str().unwrap()),
        &d.join(s["lpips"]["lin"].as_str().unwrap()),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn lpips_matches_reference() {
    let lp = lpips();
    let io = io(spec()["lpips"]["io"].as_str().unwrap());
    let (x, y) = (&io["x"], &io["y"]);
    let taps = lp.features(x).unwrap();
    for (tap, name) in taps
        .iter()
        .zip(["relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"])
    {
        close(tap, &io[&format!("x_{name}")], name);
    }
    let yv = Var::from_tensor(y).unwrap();
    let per = lp.forward_per_sample(x, yv.as_tensor()).unwrap();
    let rel = close(&per, &io["per_sample"], "per-sample LPIPS");
    let mean = per.mean_all().unwrap();
    close_scalar(
        mean.to_scalar::<f32>().unwrap() as f64,
        first(&io["mean"]),
        "LPIPS mean",
    );
    let g = mean.backward().unwrap();
    let gy = g
        .get(yv.as_tensor())
        .expect("LPIPS gives no gradient to its input");
    let grel = close(gy, &io["grad_y"], "dLPIPS/dy");
    eprintln!("LPIPS: value rel err {rel:.2e}, input gradient rel err {grel:.2e}");
}

/// The same weights under the other accepted layouts: safetensors with
/// timm/torchvision names, an LPIPS state dict (`net.sliceK.J`, numbered per
/// slice as the RAE code saves it), and resolution from a directory.
#[test]
fn lpips_weight_layouts_and_resolution() {
    let s = spec();
    let d = dir();
    let vgg_pth = d.join(s["lpips"]["vgg"].as_str().unwrap());
    let lin_pth = d.join(s["lpips"]["lin"].as_str().unwrap());
    let io = io(s["lpips"]["io"].as_str().unwrap());
    let want = lp_value(&lpips(), &io);

    let tmp = tempfile::tempdir().unwrap();
    let vgg = load_state_dict(&vgg_pth, &WeightsKey::Root, &Device::Cpu).unwrap();
    let lin = load_state_dict(&lin_pth, &WeightsKey::Root, &Device::Cpu).unwrap();
    // timm vgg16.tv_in1k layout: model.safetensors in a directory, + vgg.pth beside it
    std::fs::copy(&lin_pth, tmp.path().join("vgg.pth")).unwrap();
    candle_core::safetensors::save(&vgg, tmp.path().join("model.safetensors")).unwrap();
    let src = LpipsSource {
        vgg: tmp.path().to_string_lossy().into_owned(),
        lin: None,
    };
    let got = lp_value(&Lpips::from_source(&src, &Device::Cpu).unwrap(), &io);
    assert_eq!(got, want, "safetensors VGG + resolution from a directory");

    // one LPIPS state dict: net.sliceK.J (renumbered per slice) + lin weights
    let starts = [0usize, 4, 9, 16, 23];
    let mut all: HashMap<String, Tensor> = lin.clone();
    for (k, t) in &vgg {
        let idx: usize = k.split('.').nth(1).unwrap().parse().unwrap();
        let slice = starts.iter().rposition(|&s0| idx >= s0).unwrap();
        let leaf = k.rsplit('.').next().unwrap();
        all.insert(
            format!("net.slice{}.{}.{leaf}", slice + 1, idx - starts[slice]),
            t.clone(),
        );
    }
    let one = tmp.path().join("lpips-full.safetensors");
    candle_core::safetensors::save(&all, &one).unwrap();
    let got = lp_value(&Lpips::load(&one, &one, &Device::Cpu).unwrap(), &io);
    assert_eq!(got, want, "LPIPS state dict names");

    // a directory without the linear weights: the error says what to get
    let empty = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&vgg, empty.path().join("model.safetensors")).unwrap();
    let err = LpipsSource {
        vgg: empty.path().to_string_lossy().into_owned(),
        lin: None,
    }
    .resolve()
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("vgg.pth") && err.contains("pip install lpips"),
        "{err}"
    );
}

fn lp_value(lp: &Lpips, io: &HashMap<String, Tensor>) -> Vec<f32> {
    lp.forward_per_sample(&io["x"], &io["y"])
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn decoder_config() -> DecoderConfig {
    serde_json::from_value(spec()["decoder"].clone()).unwrap()
}

fn adamw() -> AdamWConfig {
    let s = spec();
    let o = &s["optimizer"];
    AdamWConfig {
        lr: num(o, "lr"),
        beta1: o["betas"][0].as_f64().unwrap(),
        beta2: o["betas"][1].as_f64().unwrap(),
        eps: num(o, "eps"),
        weight_decay: num(o, "weight_decay"),
    }
}

fn state(train_pos_embed: bool) -> GeneratorState {
    let theta0 = load_state_dict(
        &dir().join("gen-theta0.safetensors"),
        &WeightsKey::Root,
        &Device::Cpu,
    )
    .unwrap();
    let cfg = GeneratorConfig {
        optimizer: adamw(),
        ema: Some(num(&spec(), "ema_decay")),
        train_pos_embed,
        ..Default::default()
    };
    GeneratorState::new(&decoder_config(), &cfg, Some(&theta0), &Device::Cpu).unwrap()
}

fn batch(io: &HashMap<String, Tensor>) -> GenBatch {
    GenBatch {
        images: io["images"].clone(),
        z: io["z"].clone(),
        noise: Some(NoiseDraws {
            u: io["u"].clone(),
            eps: io["eps"].clone(),
        }),
    }
}

fn loss_config() -> GenLossConfig {
    let s = spec();
    GenLossConfig {
        perceptual_weight: num(&s, "perceptual_weight"),
        disc_weight: num(&s, "disc_weight"),
        max_d_weight: num(&s, "max_d_weight"),
    }
}

/// Every gradient against the reference's, the name sets equal, none zero.
fn check_grads(
    st: &GeneratorState,
    grads: &rae_cache::train::Gradients,
    reference: &HashMap<String, Tensor>,
) {
    let ours: BTreeSet<&str> = st
        .params()
        .trainable()
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    let with_grad: BTreeSet<&str> = grads.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(ours, with_grad, "a trainable tensor got no gradient");
    let theirs: BTreeSet<&str> = reference.keys().map(String::as_str).collect();
    assert!(
        ours.is_subset(&theirs),
        "trainable names not in the reference: {:?}",
        ours.difference(&theirs)
    );
    let mut worst = (0f32, String::new());
    for (name, g) in grads.iter() {
        assert!(max_abs(g) > 0.0, "{name}: zero gradient");
        let rel = close(g, &reference[name], name);
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    eprintln!(
        "{} gradients, worst rel err {:.2e} ({})",
        grads.len(),
        worst.0,
        worst.1
    );
}

/// Reference mode (the position table trained): the whole step.
#[test]
fn generator_step_matches_reference() {
    let s = spec();
    let io = io("gen-io.safetensors");
    let mut st = state(true);
    assert_eq!(
        st.params().trainable().len(),
        io_len("gen-grads.safetensors"),
        "reference trains every decoder tensor"
    );
    let noise = NoiseAug {
        tau: num(&s, "noise_tau"),
    };
    let b = batch(&io);
    let zt = noise.apply(&b.z, b.noise.as_ref().unwrap()).unwrap();
    // the reference's encode returns it as [B, C, h, w]
    let zt_ref = io["z_noisy"]
        .flatten_from(2)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    close(&zt, &zt_ref, "noisy latent");
    close(
        &st.decoder().forward(&zt).unwrap(),
        &io["recon"],
        "reconstruction",
    );

    let (losses, grads) = st
        .grads(Some(&lpips()), &b, noise, &loss_config(), None)
        .unwrap();
    close_scalar(losses.l1, first(&io["l1"]), "L1");
    close_scalar(losses.lpips, first(&io["lpips"]), "LPIPS");
    close_scalar(losses.total, first(&io["total"]), "total");
    assert_eq!((losses.gan, losses.adaptive_weight), (0.0, 0.0));
    check_grads(&st, &grads, &io_named("gen-grads.safetensors"));

    let sched = schedule();
    let lr = sched.lr_at(0);
    close_scalar(lr, num(&s, "lr_step0"), "lr at step 0");
    st.update(grads, lr).unwrap();
    let theta1 = io_named("gen-theta1.safetensors");
    let ema1 = io_named("gen-ema1.safetensors");
    let g_ref = io_named("gen-grads.safetensors");
    let decay = num(&s, "ema_decay");
    let eps = num(&s["optimizer"], "eps");
    let ema = st.params().ema().unwrap().tensors();
    let (mut worst_w, mut worst_e) = (0f64, 0f64);
    for (name, w) in st.params().state_dict() {
        let tol = update_tolerance(&theta1[&name], &g_ref[&name], lr, eps);
        worst_w = worst_w.max(check_within(&w, &theta1[&name], &tol, &name));
        let tol_e: Vec<f64> = tol
            .iter()
            .zip(ulps(&ema1[&name]))
            .map(|(t, u)| (1.0 - decay) * t + u)
            .collect();
        worst_e = worst_e.max(check_within(
            &ema[&name],
            &ema1[&name],
            &tol_e,
            &format!("{name} EMA"),
        ));
    }
    eprintln!("after one AdamW step: worst weight err {worst_w:.2} of its bound, EMA {worst_e:.2}");
}

/// Two f32 ulps of each value (the rounding of the stored weights).
fn ulps(t: &Tensor) -> Vec<f64> {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v.iter()
        .map(|x| 2.0 * (x.abs().max(f32::MIN_POSITIVE) as f64) * f32::EPSILON as f64)
        .collect()
}

/// Per element, the error of a first AdamW step that the gradient bound
/// allows: the step is `-lr g / (|g| + eps)`, whose derivative in g is
/// `lr eps / (|g| + eps)^2`; times the gradient tolerance of [`close`]
/// (1e-4 of the tensor's largest gradient, at least 1e-9), plus 1e-4 lr
/// and two ulps of the weight.
/// (A gradient that is zero in exact arithmetic, e.g. the key bias under
/// softmax, is rounding noise of either side: its update is too.)
fn update_tolerance(w_ref: &Tensor, g_ref: &Tensor, lr: f64, eps: f64) -> Vec<f64> {
    let dg = 1e-4 * (max_abs(g_ref) as f64).max(1e-5);
    let g = g_ref.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    g.iter()
        .zip(ulps(w_ref))
        .map(|(g, u)| {
            let a = (*g as f64).abs() + eps;
            u + 1e-4 * lr + (lr * eps * dg / (a * a)).min(2.0 * lr)
        })
        .collect()
}

/// Every |got - want| within its bound; returns the worst err / bound.
fn check_within(got: &Tensor, want: &Tensor, tol: &[f64], what: &str) -> f64 {
    assert_eq!(got.dims(), want.dims(), "{what}");
    let a = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut worst = 0f64;
    for (i, ((x, y), t)) in a.iter().zip(&b).zip(tol).enumerate() {
        let r = (*x as f64 - *y as f64).abs() / t;
        assert!(
            r <= 1.0,
            "{what}[{i}]: {x} vs reference {y} (bound {t:.3e})"
        );
        worst = worst.max(r);
    }
    worst
}

/// The default keeps the sin-cos table frozen: the rest of the step is the
/// reference's, the table stays put (in the weights and the EMA).
#[test]
fn generator_default_freezes_pos_embed() {
    let io = io("gen-io.safetensors");
    let mut st = state(false);
    assert!(st.params().trainable().iter().all(|(k, _)| k != POS_EMBED));
    let noise = NoiseAug {
        tau: num(&spec(), "noise_tau"),
    };
    let (_, grads) = st
        .grads(Some(&lpips()), &batch(&io), noise, &loss_config(), None)
        .unwrap();
    check_grads(&st, &grads, &io_named("gen-grads.safetensors"));
    st.update(grads, schedule().lr_at(0)).unwrap();
    let theta0 = io_named("gen-theta0.safetensors");
    let theta1 = io_named("gen-theta1.safetensors");
    let sd = st.params().state_dict();
    assert_eq!(max_abs_diff(&sd[POS_EMBED], &theta0[POS_EMBED]), 0.0);
    assert_eq!(
        max_abs_diff(
            &st.params().ema().unwrap().tensors()[POS_EMBED],
            &theta0[POS_EMBED]
        ),
        0.0
    );
    let g_ref = io_named("gen-grads.safetensors");
    let (lr, eps) = (schedule().lr_at(0), num(&spec()["optimizer"], "eps"));
    for (name, w) in &sd {
        if name != POS_EMBED {
            check_within(
                w,
                &theta1[name],
                &update_tolerance(&theta1[name], &g_ref[name], lr, eps),
                name,
            );
        }
    }
}

/// The adversarial seam with the reference's adaptive weight: a stand-in
/// discriminator (a fixed linear map, `logits[b] = sum(recon_pm1[b] * P)`)
/// gives `G = -mean(logits)`.
#[test]
fn generator_gan_seam_matches_reference() {
    let io = io("gen-io.safetensors");
    let st = state(true);
    let proj = io["d_proj"].clone();
    let mut adv = |x: &Tensor| -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let logits = x.broadcast_mul(&proj)?.reshape((b, ()))?.sum(1)?;
        logits.mean_all()?.neg()
    };
    let noise = NoiseAug {
        tau: num(&spec(), "noise_tau"),
    };
    let (losses, grads) = st
        .grads(
            Some(&lpips()),
            &batch(&io),
            noise,
            &loss_config(),
            Some(&mut adv),
        )
        .unwrap();
    close_scalar(losses.gan, first(&io["gan_loss"]), "G loss");
    close_scalar(
        losses.adaptive_weight,
        first(&io["adaptive_weight"]),
        "adaptive weight",
    );
    close_scalar(losses.total, first(&io["total_gan"]), "total with GAN");
    check_grads(&st, &grads, &io_named("gen-grads-gan.safetensors"));
    // a loss that ignores the reconstruction is refused, not silently zero
    let mut constant = |x: &Tensor| x.zeros_like()?.sum_all();
    assert!(
        st.grads(
            Some(&lpips()),
            &batch(&io),
            noise,
            &loss_config(),
            Some(&mut constant)
        )
        .is_err()
    );
}

fn schedule() -> LrSchedule {
    let s = spec();
    let sc = &s["schedule"];
    let spe = sc["steps_per_epoch"].as_u64().unwrap();
    assert_eq!(sc["type"], "cosine");
    LrSchedule {
        kind: ScheduleKind::Cosine,
        base_lr: num(sc, "base_lr"),
        final_lr: num(sc, "final_lr"),
        warmup_steps: sc["warmup_epochs"].as_u64().unwrap() * spe,
        decay_end_steps: sc["decay_end_epoch"].as_u64().unwrap() * spe,
        warmup_from_zero: sc["warmup_from_zero"].as_bool().unwrap(),
    }
}

#[test]
fn lr_schedule_matches_reference() {
    let io = io("gen-io.safetensors");
    let want = io["lr_schedule"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let sched = schedule();
    for (s, w) in want.iter().enumerate() {
        let got = sched.lr_at(s as u64);
        assert!(
            (got - w).abs() <= 1e-12 + 1e-9 * w,
            "step {s}: {got} vs {w}"
        );
    }
}

fn io_named(name: &str) -> HashMap<String, Tensor> {
    io(name)
}

fn io_len(name: &str) -> usize {
    io(name).len()
}
