"""Is the reversed signal the softmax's temperature? Compare the loss-attack AUC with a scale-free statistic (the
target's rank among the catalog's items, given the prefix) for z = 0 and z = 0.3 / 1.04 noise draws (split of seed 0)."""
import numpy as np

from fedmerge.privacy.attacks import attack_metrics
from fedmerge.privacy.lae import train_text_lae_user_level
from probe import probe_split

split = probe_split(0)
E = split.features.numpy().astype(np.float64)
theta0 = split.family.initial_weights(E.shape[1])
candidates = [*split.member_seqs, *split.nonmember_seqs]
member = np.arange(len(candidates)) < len(split.member_seqs)
auc = lambda scores: attack_metrics(scores[member], scores[~member])["auc"]  # noqa: E731
P = np.stack([E[np.unique(s[:-1])].sum(0) for s in candidates])
T = np.array([s[-1] for s in candidates])
for z, k in [(0.0, 0), (0.3, 0), (1.04, 0), (1.04, 1), (6.46, 0)]:
    W = train_text_lae_user_level(split.family, theta0, split.members, split.features, noise_multiplier=z, bound=1.0,
                                  noise_seed=100 + k)[0]["W"].numpy().astype(np.float64)
    S = P @ W @ E.T
    target = S[np.arange(len(T)), T]
    rank = (S > target[:, None]).sum(1)
    scale = S.std(1)
    print(f"z {z} draw {k}: loss AUC {split.loss_auc(W):.3f}  -rank AUC {auc(-rank):.3f}  "
          f"z-scored target logit AUC {auc((target - S.mean(1)) / scale):.3f}  "
          f"logit scale (members/non) {scale[member].mean():.3f}/{scale[~member].mean():.3f}  ‖W‖ {np.linalg.norm(W):.1f}",
          flush=True)
