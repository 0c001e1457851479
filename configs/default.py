"""Default: FixMatch on the embedded Fashion-MNIST (Debian package), small CNN, CPU-sized.

Command (after the README's setup):
  python -m cmix_jax.main --config=configs/default.py --workdir=runs/default
Add `--config.calibratemix.enabled=True` for CalibrateMix on top of FixMatch, or
`--config.algorithm=supervised` for the labeled-only baseline.
Expected result (measured here, 2-core CPU, ~3-4 min): test accuracy 72.7 %, ECE 0.070 (EMA,
final step 3000; 72.6 % / 0.072 on another Xeon of this kind: the CPU model moves the last
digits); the supervised baseline on the same 40 labels: 62.1 %, ECE 0.168.
"""

import ml_collections


def get_config():
  """Returns the default config; every field is documented beside it."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # draws the labeled split, the init and every random key
  config.algorithm = 'fixmatch'  # supervised | fixmatch | flexmatch | softmatch
  config.num_train_steps = 3000  # optimizer steps (USB: 2^20)
  config.log_every = 50  # steps between metric writes (the only host syncs)
  config.eval_every = 500  # steps between test-set evaluations (EMA weights)
  config.checkpoint_every = 500  # steps between checkpoints (also saved at the end)
  config.max_to_keep = 2  # newest checkpoints kept in workdir/checkpoints
  config.num_devices = -1  # local devices to use; -1 = all
  config.progress_bar = True  # tqdm bar with loss / accuracy / ECE on the terminal
  config.parallel_backend = 'pmap'  # pmap | shard_map (same per-device step code)
  config.max_nonfinite_steps = 0  # skip up to this many NaN/Inf steps, then stop
  config.lease_timeout_s = 600.0  # a workdir lease without heartbeat this long is taken over
  config.tensorboard = True  # TensorBoard event files in the workdir (gs://: uploaded whole)
  config.dynamics_sharded = False  # True: each device owns 1/D of the dynamics tables

  # XLA flags added to XLA_FLAGS before the backend starts (ones XLA_FLAGS already names win).
  # CPU only (GPU/TPU ignore it): YNNPACK for dots, convolutions and reductions, 2.3x faster
  # WRN-28-2 forward+backward on the 2-core Xeon here (experiments/bench.py). '' turns it off.
  config.xla_flags = '--xla_cpu_experimental_ynn_fusion_type=dot,reduce'
  config.distributed = ml_collections.ConfigDict()  # multi-host; env CMIX_* as fallback
  # auto: join a detected cluster (SLURM, Open MPI, multi-host Cloud TPU) or, when an address is
  # given, the explicit settings below; a single process otherwise. explicit | off.
  config.distributed.mode = 'auto'
  config.distributed.coordinator_address = ''  # e.g. '10.0.0.1:1234'; '' = none given
  config.distributed.num_processes = 0  # with an address: how many processes join (0 = env)
  config.distributed.process_id = -1  # with an address: this process's rank (-1 = env)
  config.distributed.cpu_collectives = ''  # 'gloo' for multi-process CPU runs

  config.data = ml_collections.ConfigDict()
  config.data.name = 'fashion_mnist_debian'  # or a TFDS name, 'npz:PATH', 'folder:PATH', 'fake'
  config.data.data_dir = 'data/tfds'  # TFDS data dir (ours is stored here once)
  config.data.num_labels = 40  # class-balanced: num_labels / num_classes per class
  config.data.batch_size = 32  # global labeled batch B
  config.data.uratio = 7  # unlabeled batch = uratio * B (mu)
  config.data.eval_batch_size = 500  # global batch of evaluation (any size, padded)
  config.data.include_lb_to_ulb = True  # USB: labeled samples are also unlabeled
  config.data.crop_pad_frac = 0.125  # reflect padding of 12.5 % of the side
  config.data.flip = True  # random horizontal flip in the weak view
  config.data.randaugment_ops = 3  # RandAugment ops per strong view (USB: 3)
  config.data.cutout = True  # Cutout after RandAugment in the strong view (USB: on)
  config.data.prefetch = 2  # batches prepared ahead on host threads
  config.data.val_size = 500  # held-out labeled slice: best_val selection, temperature scaling
  # Class-balanced, seeded subset of the unlabeled set (labeled samples kept in it when
  # include_lb_to_ulb), so short runs revisit each sample often; 0 or -1 = all of it.
  config.data.unlabeled_size = 0
  # data.name='fake' (tests, benchmarks): a ConfigDict of fake_data.make_fake's arguments
  # (num_train, num_test, image_shape, num_classes, seed); None = its own sizes. Unused otherwise.
  config.data.fake = ml_collections.config_dict.placeholder(ml_collections.ConfigDict)

  config.model = ml_collections.ConfigDict()
  config.model.name = 'cnn_small'  # cnn_small | wrn_28_2 | wrn_28_8 | wrn_37_2 | resnet50
  config.model.dtype = 'float32'  # 'bfloat16' computes in bf16; params, losses, tables stay f32
  # BN statistics over the global batch (SyncBN); None = True when more than one device trains.
  config.model.cross_replica_bn = ml_collections.config_dict.placeholder(bool)
  # BN running-average decay (Flax convention); None keeps the architecture's (USB: 0.999 for
  # the WRNs and cnn_small, 0.9 for ResNet-50). The stats need ~3 / (1 - decay) steps to settle,
  # so runs of a few thousand steps want 0.99.
  config.model.bn_momentum = ml_collections.config_dict.placeholder(float)
  # Input gradient of strided convs: xla (XLA's transposed conv) | subpixel (one stride-1 conv
  # over the stride's phases; same values to float rounding, faster on XLA:CPU).
  config.model.conv_grad = 'xla'
  # Conv / matmul precision: auto (usb on GPU, else default) | default (XLA's: TF32 on Ampere+
  # GPUs) | usb (TF32 convs, float32 matmuls, as PyTorch) | float32. CPU: all but float32 = today.
  config.model.precision = 'auto'

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 0.03  # initial learning rate (USB: 0.03)
  config.optim.momentum = 0.9  # SGD momentum
  config.optim.nesterov = True  # Nesterov momentum (USB: on)
  config.optim.weight_decay = 5e-4  # coupled L2, not on params with ndim <= 1
  config.optim.cosine_factor = 7 / 16  # lr * cos(factor * pi * k / K)
  config.optim.ema_decay = 0.999  # EMA of the weights used for evaluation

  config.ssl = ml_collections.ConfigDict()
  config.ssl.ulb_loss_ratio = 1.0  # lambda_u
  config.ssl.label_smoothing = 0.0  # on the labeled loss (calibration baseline)
  config.ssl.p_cutoff = 0.95  # fixmatch / flexmatch confidence threshold
  config.ssl.thresh_warmup = True  # flexmatch: unused samples count in the learning effect
  config.ssl.dist_align = True  # softmatch: align weak probs to a uniform class prior
  config.ssl.ema_p = 0.999  # softmatch EMA of p_model, mu, sigma^2
  config.ssl.n_sigma = 2.0  # softmatch: Gaussian std = sqrt(var) / n_sigma

  config.calibratemix = ml_collections.ConfigDict()
  config.calibratemix.enabled = False  # CalibrateMix on top of `algorithm` after warm-up
  config.calibratemix.warmup_steps = 600  # base loss only up to here (reference: 150k of 1M)
  config.calibratemix.passes = 2  # 2 = reference second forward pass; 1 = fused single pass
  config.calibratemix.pair_k_frac = 15 / 224  # k most dissimilar as a fraction of the pool
  config.calibratemix.mixup_alpha = 0.4  # lambda ~ Beta(alpha, alpha), one per pairing
  config.calibratemix.difficulty = 'margin'  # margin (AUM/APM) | confidence (cartography)
  config.calibratemix.pair_space = 'pixels'  # pixels | features
  config.calibratemix.apm_delta = 0.997  # APM step size delta / (1 + updates so far)
  config.calibratemix.random_pairing = False  # True = random-mixup ablation (no split)
  # True = control arm of passes=2: the second pass (SSL loss, BN and algorithm-state updates)
  # without mixed rows or mixup loss, so that "CalibrateMix - control" measures the mixup alone.
  config.calibratemix.second_pass_only = False
  # global: split and pair the global batch as one device would (same on any device count);
  # device: each device splits and pairs its own share (what DDP does).
  config.calibratemix.pair_scope = 'global'
  # Pair on images average-pooled by this factor (1 = full size): global scope gathers
  # 1/f^2 of the pixels; mixing still uses the full-size images.
  config.calibratemix.pair_downsample = 1

  config.eval = ml_collections.ConfigDict()
  config.eval.num_bins = 10  # equal-width confidence bins of ECE and the diagram
  config.eval.selection = 'final'  # final | best_val | best_test (USB's practice, peeks at test)
  config.eval.plots = True  # reliability diagram, histogram, curves, data maps at the end
  return config
