"""The smallest run worth sweeping: digits, a tiny MLP, 2 epochs; shared by the Ray and SLURM tests."""

TINY_RUN = {
    "dataset": "digits",
    "encoder": "mlp",
    "latent_dim": 8,
    "k": 3,
    "epochs": 2,
    "batch_size": 100,
    "eval_every": 1,
    "probe_width": 16,
    "probe_folds": 2,  # the least cross-fitting there is: H[Y|Z] is tested in test_infoplane
    "augment": False,
    "fgsm_eps": [0.0, 0.05],
    # the whole attack suite, on a small budget: these runs test where runs execute, not attack strength
    "pgd_steps": 3,
    "apgd_steps": 5,
    "square_queries": 20,
    "attack_images": 100,
    # every epoch checkpointed: these tests stop runs at known epochs (the default interval, and the checkpoint a
    # stop signal forces, are tested in test_train, test_faults and test_slurm's signalled job)
    "checkpoint_every_s": 0,
}
