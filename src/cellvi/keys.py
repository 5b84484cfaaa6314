"""One namespace of tensor keys, shared by the data loaders and the modules.

A minibatch is a ``dict[str, torch.Tensor]`` whose keys are these constants.
"""

X = "X"  #: counts, (cells, genes)
BATCH = "batch"  #: batch index, (cells, 1) int64
LABELS = "labels"  #: label index, (cells, 1) int64
SIZE_FACTOR = "size_factor"  #: user size factor, (cells, 1)
CAT_COVS = "cat_covs"  #: extra categorical covariates, (cells, n_cat_covs) int64
CONT_COVS = "cont_covs"  #: continuous covariates, (cells, n_cont_covs)
INDICES = "indices"  #: row index into the AnnData, (cells, 1) int64
X_T = "X_T"  #: transposed counts, (genes, cells) sparse CSR; present when X is sparse CSR
INDICES_NONZERO = "x_nonzero"  #: (2, nnz) int64 (row, column) of the non-zero counts in X
