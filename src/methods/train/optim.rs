//! SGD, Adam and AdamW with PyTorch's update rules and state that can be checkpointed.
//!
//! candle-nn's optimizers keep their state private, so a run could not be resumed exactly with
//! them; these expose every state tensor (momentum buffers, Adam moments) and per-parameter step
//! counts. Updates run as candle ops on the parameters' device.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use super::config::OptimizerConfig;

/// One parameter and its optimizer state.
struct Param {
    var: Var,
    /// SGD's momentum buffer or Adam's first moment; `None` when the rule keeps none.
    m: Option<Tensor>,
    /// Adam's second moment.
    v: Option<Tensor>,
    /// Updates applied so far. PyTorch counts per parameter (a parameter without a gradient is
    /// skipped and its Adam bias correction does not advance), and so does this.
    steps: u64,
}

/// An optimizer over a fixed list of variables; only they are ever written.
pub struct Optimizer {
    cfg: OptimizerConfig,
    params: Vec<Param>,
}

impl Optimizer {
    pub fn new(cfg: OptimizerConfig, vars: Vec<Var>) -> Result<Self> {
        let (with_m, with_v) = match cfg {
            OptimizerConfig::Sgd { momentum, .. } => (momentum != 0.0, false),
            OptimizerConfig::Adam { .. } | OptimizerConfig::AdamW { .. } => (true, true),
        };
        let params = vars
            .into_iter()
            .map(|var| {
                let zeros = || var.as_tensor().zeros_like();
                Ok(Param {
                    m: with_m.then(zeros).transpose()?,
                    v: with_v.then(zeros).transpose()?,
                    var,
                    steps: 0,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { cfg, params })
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Applies one update at learning rate `lr` to every parameter that has a gradient.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let cfg = self.cfg.clone();
        for p in &mut self.params {
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            p.steps += 1;
            let theta = p.var.as_tensor().detach();
            let grad = grad.detach();
            let updated = match cfg {
                OptimizerConfig::Sgd {
                    momentum,
                    nesterov,
                    weight_decay,
                    ..
                } => sgd(p, &theta, grad, lr, momentum, nesterov, weight_decay)?,
                OptimizerConfig::Adam {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    ..
                } => {
                    let grad = if weight_decay != 0.0 {
                        (grad + (&theta * weight_decay)?)?
                    } else {
                        grad
                    };
                    adam(p, &theta, &grad, lr, beta1, beta2, eps)?
                }
                OptimizerConfig::AdamW {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    ..
                } => {
                    let decayed = (&theta * (1.0 - lr * weight_decay))?;
                    adam(p, &decayed, &grad, lr, beta1, beta2, eps)?
                }
            };
            p.var.set(&updated)?;
        }
        Ok(())
    }

    /// Per-parameter update counts, in parameter order.
    pub fn steps(&self) -> Vec<u64> {
        self.params.iter().map(|p| p.steps).collect()
    }

    /// Every state tensor, named `optim.<i>.m` / `optim.<i>.v` by parameter index.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            if let Some(m) = &p.m {
                out.push((format!("optim.{i}.m"), m.clone()));
            }
            if let Some(v) = &p.v {
                out.push((format!("optim.{i}.v"), v.clone()));
            }
        }
        out
    }

    /// Restores what [`Optimizer::state_tensors`] and [`Optimizer::steps`] returned; `tensors`
    /// may hold other entries. Errors name the first missing or mis-shaped tensor.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        steps: &[u64],
    ) -> std::result::Result<(), String> {
        if steps.len() != self.params.len() {
            return Err(format!(
                "optimizer state for {} parameters, the run trains {}",
                steps.len(),
                self.params.len()
            ));
        }
        for (i, (p, &n)) in self.params.iter_mut().zip(steps).enumerate() {
            for (slot, which) in [(&mut p.m, "m"), (&mut p.v, "v")] {
                let Some(current) = slot.as_mut() else {
                    continue;
                };
                let name = format!("optim.{i}.{which}");
                let t = tensors
                    .get(&name)
                    .ok_or_else(|| format!("missing optimizer state `{name}`"))?;
                if t.dims() != current.dims() || t.dtype() != current.dtype() {
                    return Err(format!(
                        "optimizer state `{name}` is {:?} {:?}, the parameter is {:?} {:?}",
                        t.dtype(),
                        t.dims(),
                        current.dtype(),
                        current.dims()
                    ));
                }
                *current = t
                    .to_device(current.device())
                    .map_err(|e| format!("{name}: {e}"))?;
            }
            p.steps = n;
        }
        Ok(())
    }
}

/// `torch.optim.SGD` (dampening 0), returning the new parameter value.
fn sgd(
    p: &mut Param,
    theta: &Tensor,
    grad: Tensor,
    lr: f64,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
) -> Result<Tensor> {
    let mut d = if weight_decay != 0.0 {
        (grad + (theta * weight_decay)?)?
    } else {
        grad
    };
    if let Some(buf) = p.m.as_mut() {
        // The buffer starts as the first gradient itself, not as momentum·0 + g.
        *buf = if p.steps == 1 {
            d.clone()
        } else {
            ((&*buf * momentum)? + &d)?
        };
        d = if nesterov {
            (d + (&*buf * momentum)?)?
        } else {
            buf.clone()
        };
    }
    theta - (d * lr)?
}

/// The Adam step shared by Adam and AdamW, on an already decayed `theta` / L2-augmented `grad`.
fn adam(
    p: &mut Param,
    theta: &Tensor,
    grad: &Tensor,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
) -> Result<Tensor> {
    let (Some(m), Some(v)) = (p.m.as_mut(), p.v.as_mut()) else {
        candle_core::bail!("Adam state missing");
    };
    // m.lerp_(g, 1 − β1) and v·β2 + (1 − β2)·g², as PyTorch writes them.
    *m = (&*m + ((grad - &*m)? * (1.0 - beta1))?)?;
    *v = ((&*v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
    let t = p.steps as i32;
    let bias1 = 1.0 - beta1.powi(t);
    let bias2_sqrt = (1.0 - beta2.powi(t)).sqrt();
    let denom = ((v.sqrt()? / bias2_sqrt)? + eps)?;
    theta - ((&*m / &denom)? * (lr / bias1))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Runs `steps` updates of `cfg` on loss ½·Σθ² (so ∇ = θ) from θ = (1, −2).
    fn run(cfg: OptimizerConfig, steps: usize) -> Vec<Vec<f32>> {
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).expect("var");
        let mut opt = Optimizer::new(cfg.clone(), vec![var.clone()]).expect("optimizer");
        let lr = cfg.lr();
        (0..steps)
            .map(|_| {
                let loss = (var.as_tensor().sqr().expect("sqr") * 0.5)
                    .and_then(|t| t.sum_all())
                    .expect("loss");
                let grads = loss.backward().expect("backward");
                opt.step(&grads, lr).expect("step");
                var.as_tensor().to_vec1::<f32>().expect("values")
            })
            .collect()
    }

    fn assert_close(got: &[Vec<f32>], want: &[[f64; 2]]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            for (a, b) in g.iter().zip(w) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "got {g:?}, want {w:?}"
                );
            }
        }
    }

    #[test]
    // 0.6931 below is the second iterate, not an approximation of ln 2.
    #[allow(clippy::approx_constant)]
    fn sgd_with_momentum_and_weight_decay_matches_pytorch() {
        // lr 0.1, μ 0.9, wd 0.1, ∇ = θ, so g = 1.1·θ; θ0 = 1 (second coordinate = −2·first):
        //   1: g = 1.1,    b = 1.1,                   θ = 1 − 0.11        = 0.89
        //   2: g = 0.979,  b = 0.99 + 0.979 = 1.969,  θ = 0.89 − 0.1969    = 0.6931
        //   3: g = 0.76241, b = 1.7721 + 0.76241 = 2.53451, θ = 0.6931 − 0.253451 = 0.439649
        // PyTorch: p = torch.tensor([1., -2.], requires_grad=True);
        //   opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1)
        //   3 × (opt.zero_grad(); (0.5 * p.pow(2).sum()).backward(); opt.step())
        let got = run(
            OptimizerConfig::Sgd {
                lr: 0.1,
                momentum: 0.9,
                nesterov: false,
                weight_decay: 0.1,
            },
            3,
        );
        assert_close(
            &got,
            &[[0.89, -1.78], [0.6931, -1.3862], [0.439649, -0.879298]],
        );
    }

    #[test]
    fn sgd_nesterov_matches_pytorch() {
        // As above with nesterov=True: the step is g + μ·b.
        //   1: g = 1.1, b = 1.1, d = 1.1 + 0.99 = 2.09, θ = 1 − 0.209 = 0.791
        //   2: g = 0.8701, b = 0.99 + 0.8701 = 1.8601, d = 0.8701 + 1.67409 = 2.54419,
        //      θ = 0.791 − 0.254419 = 0.536581
        //   3: g = 0.5902391, b = 1.67409 + 0.5902391 = 2.2643291,
        //      d = 0.5902391 + 2.03789619 = 2.62813529, θ = 0.536581 − 0.262813529 = 0.273767471
        let got = run(
            OptimizerConfig::Sgd {
                lr: 0.1,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 0.1,
            },
            3,
        );
        assert_close(
            &got,
            &[
                [0.791, -1.582],
                [0.536581, -1.073162],
                [0.273767471, -0.547534942],
            ],
        );
    }

    #[test]
    fn sgd_converges_on_a_shifted_quadratic() {
        // candle-nn's own check: minimise (x − 4.2)² from 0 with plain SGD.
        let var = Var::new(&[0.0f32], &Device::Cpu).expect("var");
        let mut opt = Optimizer::new(
            OptimizerConfig::Sgd {
                lr: 0.1,
                momentum: 0.0,
                nesterov: false,
                weight_decay: 0.0,
            },
            vec![var.clone()],
        )
        .expect("optimizer");
        for _ in 0..100 {
            let loss = (var.as_tensor() - 4.2)
                .and_then(|t| t.sqr())
                .and_then(|t| t.sum_all())
                .expect("loss");
            opt.step(&loss.backward().expect("backward"), 0.1)
                .expect("step");
        }
        let x = var.as_tensor().to_vec1::<f32>().expect("x")[0];
        assert!((x - 4.2).abs() < 1e-4, "{x}");
        // Momentum SGD gets there too.
        let var = Var::new(&[0.0f32], &Device::Cpu).expect("var");
        let mut opt = Optimizer::new(
            OptimizerConfig::Sgd {
                lr: 0.05,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 0.0,
            },
            vec![var.clone()],
        )
        .expect("optimizer");
        for _ in 0..300 {
            let loss = (var.as_tensor() - 4.2)
                .and_then(|t| t.sqr())
                .and_then(|t| t.sum_all())
                .expect("loss");
            opt.step(&loss.backward().expect("backward"), 0.05)
                .expect("step");
        }
        let x = var.as_tensor().to_vec1::<f32>().expect("x")[0];
        assert!((x - 4.2).abs() < 1e-4, "{x}");
    }

    #[test]
    fn adam_two_steps_by_hand() {
        // lr 0.1, β = (0.9, 0.999), ε = 1e-8, ∇ = θ, θ0 = (1, −2):
        //   1: m = 0.1·g, v = 0.001·g², m̂ = g, v̂ = g², θ = θ0 − 0.1·g/(|g| + ε) = (0.9, −1.9)
        //   2: g = (0.9, −1.9); m = 0.09·(1, −2) + 0.1·g = (0.18, −0.37);
        //      v = 0.000999·(1, 4) + 0.001·(0.81, 3.61) = (0.001809, 0.007606);
        //      m̂ = m/0.19, √v̂ = √(v/0.001999); θ = (0.80041223, −1.80016649)
        let got = run(OptimizerConfig::adam(0.1), 2);
        assert_close(
            &got,
            &[[0.900000001, -1.9000000005], [0.8004122297, -1.8001664866]],
        );
    }

    #[test]
    fn adam_l2_and_adamw_decoupled_decay_by_hand() {
        // Adam with weight_decay 0.5 adds 0.5·θ to the gradient, so g = 1.5·θ: a pure rescale of
        // the gradient, which Adam's normalisation cancels up to ε. Step 2 differs from plain Adam
        // only through ε: θ = (0.8004122290, −1.8001664863).
        let got = run(
            OptimizerConfig::Adam {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.5,
            },
            2,
        );
        assert_close(
            &got,
            &[[0.9000000007, -1.9000000003], [0.8004122290, -1.8001664863]],
        );
        // AdamW with weight_decay 0.5: θ ← θ·(1 − 0.05) first, then the Adam step on the
        // gradient taken at the undecayed θ:
        //   1: θ = 0.95·(1, −2) − 0.1·sign = (0.85, −1.8)
        //   2: g = (0.85, −1.8); m = (0.09 + 0.085, −0.18 − 0.18) = (0.175, −0.36);
        //      v = (0.000999 + 0.0007225, 0.003996 + 0.00324) = (0.0017215, 0.007236);
        //      θ = 0.95·(0.85, −1.8) − 0.1·m̂/(√v̂ + ε) = (0.70824844, −1.61041223)
        let got = run(
            OptimizerConfig::AdamW {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.5,
            },
            2,
        );
        assert_close(
            &got,
            &[[0.850000001, -1.8000000005], [0.7082484444, -1.6104122287]],
        );
    }

    #[test]
    fn parameters_without_gradients_are_left_alone() {
        let used = Var::new(&[1.0f32], &Device::Cpu).expect("var");
        let unused = Var::new(&[3.0f32], &Device::Cpu).expect("var");
        let mut opt = Optimizer::new(
            OptimizerConfig::AdamW {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
            },
            vec![used.clone(), unused.clone()],
        )
        .expect("optimizer");
        let loss = used.as_tensor().sum_all().expect("loss");
        opt.step(&loss.backward().expect("backward"), 0.1)
            .expect("step");
        assert_eq!(opt.steps(), vec![1, 0]);
        assert_eq!(unused.as_tensor().to_vec1::<f32>().expect("v"), vec![3.0]);
        assert_ne!(used.as_tensor().to_vec1::<f32>().expect("v"), vec![1.0]);
    }

    #[test]
    fn state_round_trips_and_mismatches_are_reported() {
        let var = Var::zeros(3, DType::F32, &Device::Cpu).expect("var");
        let mut opt = Optimizer::new(OptimizerConfig::adam(0.1), vec![var.clone()]).expect("opt");
        let loss = (var.as_tensor() - 1.0)
            .and_then(|t| t.sqr())
            .and_then(|t| t.sum_all())
            .expect("loss");
        opt.step(&loss.backward().expect("backward"), 0.1)
            .expect("step");
        let saved: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
        let mut keys: Vec<&String> = saved.keys().collect();
        keys.sort();
        assert_eq!(keys, ["optim.0.m", "optim.0.v"]);

        let mut fresh = Optimizer::new(OptimizerConfig::adam(0.1), vec![var.clone()]).expect("opt");
        fresh.load_state(&saved, &opt.steps()).expect("load");
        assert_eq!(fresh.steps(), vec![1]);
        for ((_, a), (_, b)) in fresh.state_tensors().iter().zip(opt.state_tensors().iter()) {
            assert_eq!(
                a.to_vec1::<f32>().expect("a"),
                b.to_vec1::<f32>().expect("b")
            );
        }
        let err = fresh.load_state(&HashMap::new(), &[1]).unwrap_err();
        assert!(err.contains("optim.0.m"), "{err}");
        let err = fresh.load_state(&saved, &[1, 2]).unwrap_err();
        assert!(err.contains("2 parameters"), "{err}");
    }
}
