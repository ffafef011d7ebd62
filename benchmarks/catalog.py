"""The benchmark's configuration names, their kind (a configuration is compared with the
peers of its kind) and what each is. Kept free of heavy imports: ``run.py`` reads it
before it starts the memory subprocesses, while its own footprint is still small."""

CONFIGS: dict[str, tuple[str, str]] = {
    "deterministic": ("deterministic", "plain ResNet-20, SGD (momentum 0.9)"),
    "mean_field": ("mean_field", "ours: MeanFieldGuide, estimator='weight' (one weight draw per batch)"),
    "mean_field_lrt": ("local_reparameterization", "ours: MeanFieldGuide, estimator='local'"),
    "mean_field_flipout": ("flipout", "ours: MeanFieldGuide, estimator='flipout'"),
    "gbnn_tied": ("gbnn", "ours: SharedMixtureGuide(semantics='tied') fine-tuning"),
    "gbnn_independent": ("gbnn", "ours: SharedMixtureGuide(semantics='independent'), estimator='local'"),
    "gbnn_hierarchical": ("gbnn", "ours: SharedMixtureGuide(semantics='hierarchical'), estimator='local'"),
    "ssvi_d100": ("ssvi", "ours: SparseSubspaceGuide, density 1.0, estimator='local' (the SSVI configs')"),
    "ssvi_d10": ("ssvi", "ours: SparseSubspaceGuide, density 0.1, estimator='local'"),
    "ssvi_d05": ("ssvi", "ours: SparseSubspaceGuide, density 0.05, estimator='local'"),
    "tyxe": ("mean_field", "TyXe VariationalBNN + tyxe.guides.AutoNormal, TraceMeanField_ELBO"),
    "tyxe_lrt": ("local_reparameterization", "TyXe as 'tyxe', trained inside tyxe.poutine.local_reparameterization()"),
    "bt_reparam": ("mean_field", "bayesian-torch dnn_to_bnn(type='Reparameterization')"),
    "bt_flipout": ("flipout", "bayesian-torch dnn_to_bnn(type='Flipout')"),
    "pyro_autonormal": ("mean_field", "plain Pyro: PyroSample priors, AutoNormal, Trace_ELBO, Predictive"),
}
GBNN_CONFIGS = ("gbnn_tied", "gbnn_independent", "gbnn_hierarchical")
