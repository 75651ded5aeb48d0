"""The aggregator's YAML configuration (see config/aggregator.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from fedbell.config import (
    Cosine,
    Count,
    Fraction,
    MqttSettings,
    NonNegativeSeconds,
    Positive,
    PositiveCount,
    Seconds,
    Share,
    SigningSettings,
    SiteId,
    StrictModel,
    Threads,
    UpdateCodec,
    member_of,
)
from fedbell.tier import TierMqttSettings
from fedbell.wire.codecs import DEFAULT_DENSITY
from fedbell.wire.envelope import Codec
from fedbell.wire.protocol import TrainingPlan

DEFAULT_THRESHOLD = 0.75
"""Cosine threshold when no strangers calibrate one (see README: what it means)."""
START_HEAD_THRESHOLD = 0.94
"""What a site that must calibrate (evaluation.require_calibration) but has no stranger
photos ships with version 0, dlib's own projection: 1.0 % and 0.8 % of never-seen strangers
got in at it (`python -m bench.bare_threshold --people 300`, seeds 0 and 1: LFW under doorbell
conditions, 5,120 and 3,723 stranger probes; 0.936 let 2.03 % in on seed 0, over a 2 % bar;
0.75 let 100 % in). It holds for that head only: after 30 rounds the same 2 % needed 0.56, so
a trained head is published only once calibrated (by the doorbells: aggregator/calibration.py)."""
DOWNLINK_CODECS: tuple[Codec, ...] = ("float32", "float16", "int8")
# topk would drop most of the model: it only makes sense for deltas.
DownlinkCodec = Annotated[Codec, member_of(DOWNLINK_CODECS)]

Strategy = Literal["fedavg", "clipped", "median", "trimmed_mean", "multi_krum"]
Weighting = Literal["houses", "examples"]
BUFFERED_STRATEGIES: tuple[Strategy, ...] = ("median", "trimmed_mean", "multi_krum")
"""Strategies that need every update of a round at once (see aggregator/accumulator.py)."""
ServerOptimizerKind = Literal["none", "fedavgm", "fedadam"]
Trainable = Literal["head", "last_level"]
DEFAULT_SERVER_LR = {"fedavgm": 1.0, "fedadam": 0.01}
"""fedadam's step is about lr per coordinate whatever the update's size: keep it small."""
DEFAULT_CLIP_NORM = 1.0
"""Set from the head it moves: dlib's projection, the start of every lineage, has a
Frobenius norm of 1.845, so one update may move it by at most ~54 % of its whole size
(2.0, the former default, was more than the whole head). Measured with the real client
step (`edge.trainer.train_delta`, the default plan: 5 epochs, batch 8, lr 0.001) on 200
LFW training houses under doorbell conditions (`bench.data.load_bench`, seed 0): honest
update norms median 0.52, 99th percentile 0.82, largest 0.84; 1.0 leaves every one of them
whole (top-k updates carrying many rounds of residual, up to 1.76, are scaled down)."""
DEFAULT_MAX_EXAMPLES = 200
"""With weighting examples: a doorbell trains on its gallery, 2-27 photos per training house
measured above, a few hundred at most (training.max_images_per_person per resident)."""
DEFAULT_MAX_SHARE = 0.25
"""multi_krum with weighting examples: no kept update weighs more than a quarter of the round."""
DEFAULT_MAX_ACCURACY_DROP = 0.15
"""A release scoring 15 points below the published model on the evaluation set is refused:
"far worse", well outside round-to-round noise (±3 points on LFW's 436 held-out probes in
make bench-openset, more on a small evaluation folder; 5 points stalled the generated demo)."""
DEFAULT_MAX_ACCURACY_LOSS = 0.01
"""A release scoring 1 point below the lineage's start (version 0, re-scored on the same
evaluation set) is refused, however small each step that led there: a reference that cannot
be walked down. A hostile doorbell in every round cancels the honest ones' progress and walks
the model down to this bar, so it must sit within what an honest federation gains
(`python -m bench.drift`, LFW, 6 honest houses and one pushing the head along the features'
main directions, halving its step after each refusal, 12 rounds, seeds 0-2: at 3 points the
attacked model ended 0.6-4.5 points below the honest run, at 1 point -0.4 to 1.2; the honest
run itself ended no lower at 1 point than at 3 on average, 0.782 against 0.781)."""


DEFAULT_MIN_COHORT = 5
"""A secure round never reveals a sum of fewer houses than this (issue 22)."""
DEFAULT_SECURE_DENSITY = 0.10
"""A secure round's shared random subset is twice top-k's 5 %: random coordinates carry less
of an update than each house's largest ones. Measured (`bench.privacy`'s utility runs, LFW
houses under doorbell conditions, 2,000 houses, 100 per round, 60 rounds, clip 0.02, seed 0):
open-set accuracy plain top-k 5 % 0.823; secure 5 % 0.806, 10 % 0.815, 20 % 0.815. With
3-byte masked values a round of 100 then uploads 18.8 kB per doorbell (`make bench-secagg`)."""

DEFAULT_SECURE_CLIP_NORM = 0.02
"""A secure round's doorbell clips the subset it sends (10 %) to this, the size of honest
ones: measured by `bench.privacy` (its default run: 2,000 LFW houses under doorbell
conditions, 100 a round, epsilon 8, seed 0; the subsets' L2 norms before clipping, 10th /
50th / 90th percentile) 0.029 / 0.030 / 0.032 in round 1, 0.010 / 0.013 / 0.016 in round 60.
0.02 sits between: round 1's updates are scaled to two thirds, later ones mostly pass
whole, and the noise, z times the clip, stays near the updates' own size (the plain clip,
1.0, is 50 times it and would drown them). Open-set accuracy there: 0.818 (plain 0.820)."""

DEFAULT_EPSILON_BUDGET = 8.0
DEFAULT_PLANNED_ROUNDS = 60
"""House-level DP is on by default at epsilon 8 over 60 rounds (delta = 1/houses). Measured
(`bench.privacy`, the federation above, 100 houses per round): open-set accuracy 0.819 at
epsilon 8 against 0.816 secure without noise and 0.810 at epsilon 1, while the attacks on a
round's sum and on the published heads stay at chance (0.531 and 0.508 against 0.50). Epsilon
8 is the largest of the measured settings: the privacy it buys is already at chance for the
attacks, and more noise only costs accuracy (and, on a site of few houses, drowns it)."""
DEFAULT_MAX_DROPOUT = 0.3
"""With noise: a secure round is built to unmask with up to 30 % of its doorbells gone, and each
doorbell adds noise for the 70 % that must remain. Splitting it among `min_cohort` (5) instead
put sqrt(100 / 5) = 4.5 times the needed noise into a round of 100 (issue 22)."""


class PrivacySettings(StrictModel):
    """House-level differential privacy of secure rounds (DP-FedAvg, the doorbell adds noise).

    On by default: the federation may spend epsilon_budget over planned_rounds rounds, and the
    aggregator sizes each round's noise with the accountant so that it can; a round that would
    pass the budget is refused. `epsilon_budget: null` turns the noise off (a site of a few
    houses, where any noise that protects them drowns their updates)."""

    epsilon_budget: Positive | None = DEFAULT_EPSILON_BUDGET
    """Total epsilon (at delta = 1/houses) the federation may spend; a round that would take it
    past this is refused (privacy_budget_spent). null: no noise and no budget."""
    planned_rounds: PositiveCount = DEFAULT_PLANNED_ROUNDS
    """The rounds epsilon_budget is spread over: each round's noise multiplier is the smallest
    with which this many rounds of its size stay within the budget (then rounds stop)."""
    noise_multiplier: float | None = Field(default=None, ge=0, le=100)
    """Set z instead of deriving it from epsilon_budget and planned_rounds: the round's sum
    carries Gaussian noise of standard deviation z x secure_clip_norm, split among the doorbells
    that must survive (each adds its part, so the aggregator never sees a noiseless sum)."""
    max_dropout: float = Field(default=DEFAULT_MAX_DROPOUT, ge=0, lt=1)
    """With noise: the share of a round's selected doorbells that may drop out before unmasking.
    The noise is split among the rest (at least min_cohort), and a round that loses more is
    abandoned (fail closed), so every unmasked sum carries the full noise. Higher: rounds survive
    more dropouts but carry more noise than the guarantee needs when all doorbells answer."""
    houses: PositiveCount | None = None
    """Houses in the federation: delta = 1/houses and the sampling rate (selected / houses) of the
    accountant; default: the provisioned doorbells (signing.trusted_keys_dir), else the doorbells
    seen online."""

    @model_validator(mode="after")
    def _budget_needs_noise(self) -> Self:
        if self.epsilon_budget is not None and self.noise_multiplier == 0:
            raise ValueError(
                f"noise_multiplier 0 with epsilon_budget {self.epsilon_budget:g}: without "
                "noise every round's epsilon is infinite, so no round would fit the budget; "
                "to turn house-level DP off set epsilon_budget: null"
            )
        return self


class RoundSettings(StrictModel):
    # Measured (make bench, att_faces, 10 doorbells, 30 rounds): top-k 5 % is
    # 28x smaller than float32 updates and ends level with it; int8 is 3.6x.
    codec: UpdateCodec = "topk"
    """Codec every node must use for its update this round (float32, float16, int8 or topk)."""
    # Measured (make bench, LFW houses under doorbell conditions, 30 rounds x 20
    # houses, seeds 0-4): top-k 5 % up with the int8 head down is 0.155x float32
    # FedAvg's traffic per doorbell per round (3.7 kB up + 32.5 kB down against
    # 111 + 123 kB) and ends +0.4 points of open-set accuracy from it (per seed
    # +0.8, +1.0, +0.4, -0.3, +0.0; 95 % low end -0.3); int8 instead of float32
    # down alone: +0.1 (sd 1.0). The aggregator keeps the exact head as its base.
    downlink_codec: DownlinkCodec = "int8"
    """Codec of the retained global model (float32, float16 or int8). The aggregator keeps the exact
    head; doorbells train from and recognise with the decoded one, which the threshold is calibrated
    on."""
    timeout_s: Seconds = 300.0
    """Updates arriving later than this are refused."""
    min_updates: PositiveCount = 1
    """Quorum: the fewest updates a round needs to be aggregated."""
    max_devices: PositiveCount | None = None
    """Select at most this many online devices (random); default: all."""
    max_update_norm: Positive = 1000.0
    """An update whose L2 norm exceeds this is rejected as absurd."""
    train: TrainingPlan = Field(default_factory=TrainingPlan)
    """Hyper-parameters sent to the nodes."""
    seed: int = 0
    """Seed for device selection."""
    auto_pause_s: NonNegativeSeconds = 1.0
    """Wait this long after start-up or after a round before starting the next automatic one, so
    retained device statuses arrive and nodes load the new model."""
    density: Share = DEFAULT_DENSITY
    """With codec topk: share of each tensor's entries a node sends (its largest)."""
    secure_density: Share = DEFAULT_SECURE_DENSITY
    """With secure_aggregation: share of the head's entries every node sends, the round's shared
    random subset (masks only cancel on common coordinates)."""
    secure_clip_norm: Positive = DEFAULT_SECURE_CLIP_NORM
    """With secure_aggregation: each doorbell clips the subset it sends to this L2 norm before
    masking (what one house can add to the sum), and the privacy noise is noise_multiplier x
    this. Set from honest subsets' measured size: a clip far above them only inflates the
    noise."""

    strategy: Strategy = "fedavg"
    """fedavg: streaming weighted average (default); clipped: the same after scaling each update
    down to clip_norm; median, trimmed_mean: coordinate-wise robust rules; multi_krum: drop the
    `byzantine` updates farthest from the others, FedAvg the rest (best against poisoning with
    non-IID doorbells, see make bench-robust). The last three hold every update of the round in
    memory (need max_devices)."""
    clip_norm: Positive | None = DEFAULT_CLIP_NORM
    """Plain rounds with fedavg and clipped: each update's L2 norm is scaled down to this before it
    is averaged (on by default; null turns it off for fedavg). Raise it with the training plan's
    learning rate or epochs. Secure rounds clip on the doorbell, to secure_clip_norm."""
    weighting: Weighting = "houses"
    """What an accepted update weighs in a plain round's average (fedavg, clipped, multi_krum):
    houses, the same for every doorbell, as in a secure round; examples, its claimed example count
    up to max_examples, for a site that trusts its doorbells (a count is the doorbell's own word:
    one claiming max_examples among honest ones of 50 moves the average 4 times as far as each of
    them). median and trimmed_mean weigh every house the same either way."""
    max_examples: int = Field(default=DEFAULT_MAX_EXAMPLES, ge=1, le=10_000_000)
    """With weighting examples: an update weighs at most this many examples, whatever its doorbell
    claims (a gallery is at most a few hundred photos)."""
    max_share: Share = DEFAULT_MAX_SHARE
    """With multi_krum and weighting examples: no kept update weighs more than this share of the
    round (weights clipped to a common level; equal weights when fewer than 1/share updates are
    kept)."""
    max_accuracy_drop: Fraction | None = DEFAULT_MAX_ACCURACY_DROP
    """A new version whose open-set accuracy on evaluation.dataset is more than this below the
    published version's is not published: the round is abandoned and the model stays (null: publish
    whatever it scores)."""
    max_accuracy_loss: Fraction | None = DEFAULT_MAX_ACCURACY_LOSS
    """A new version whose open-set accuracy on evaluation.dataset is more than this below the
    lineage's start (version 0) is not published, so releases cannot drift down in steps each within
    max_accuracy_drop (null: no such bar)."""
    trim_fraction: float = Field(default=0.1, ge=0, lt=0.5)
    """With strategy trimmed_mean: share of the largest and of the smallest values dropped per
    coordinate."""
    byzantine: Count = 1
    """With strategy multi_krum: how many updates per round may be hostile (that many are dropped
    each round)."""
    secure_aggregation: bool = False
    """Doorbells mask their updates (pairwise masks, Shamir-shared seeds) so the aggregator and the
    broker only ever see the sum of at least min_cohort houses; each doorbell clips its update to
    secure_clip_norm and adds its share of the privacy noise. Every house weighs the same (the
    aggregator cannot see example counts), and only fedavg and clipped can aggregate a sum."""
    min_cohort: int = Field(default=DEFAULT_MIN_COHORT, ge=2)
    """With secure_aggregation: a round whose doorbells fall below this at any phase is abandoned
    (fail closed): no sum of fewer houses is ever unmasked."""
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    """With secure_aggregation: the epsilon budget, the noise that spends it, and delta."""
    server_optimizer: ServerOptimizerKind = "none"
    """none: add the aggregated delta; fedavgm: server momentum; fedadam: Adam on the aggregated
    delta (with `train.optimizer: sgd` it keeps across rounds the moments central training keeps:
    issue 20, docs/learning.md). Its moments are saved with the model."""
    server_learning_rate: Positive | None = None
    """Default 1.0 with fedavgm, 0.01 with fedadam."""
    server_momentum: float = Field(default=0.9, ge=0, lt=1)
    """fedavgm's momentum, fedadam's beta1."""
    trainable: Trainable = "head"
    """What the federation trains: head, the 256x128 projection on dlib's pooled features
    (32,768 values); last_level, dlib's last residual level too (`fedbell.faces.last_level`:
    688,640 values, the backbone the doorbells run stops before it). Changing it on an
    aggregator with state starts a new lineage, as a new backbone does."""

    @model_validator(mode="after")
    def _strategy_settings(self) -> Self:
        if self.strategy == "clipped" and self.clip_norm is None:
            raise ValueError(
                "strategy clipped needs clip_norm (the L2 norm each update is scaled down to)"
            )
        if self.secure_aggregation:
            self._secure_settings()
        if self.strategy in BUFFERED_STRATEGIES and self.codec == "topk":
            raise ValueError(
                f"strategy {self.strategy} with codec topk: each doorbell sends a different "
                f"{self.density:.0%} of the coordinates, so a coordinate-wise vote sees "
                "mostly zeros (the median of three disjoint top-k updates is all zeros) and "
                "Multi-Krum's distances compare which coordinates were sent; set "
                "rounds.codec to float32, float16 or int8 with this strategy, or use "
                "fedavg/clipped with topk"
            )
        if self.strategy in BUFFERED_STRATEGIES and self.max_devices is None:
            raise ValueError(
                f"strategy {self.strategy} keeps all deltas of a round in "
                "memory and on disk, so it needs max_devices to bound them"
            )
        return self

    def _secure_settings(self) -> None:
        if self.weighting == "examples":
            raise ValueError(
                "weighting examples with secure_aggregation: a masked update carries no "
                "example count, every house weighs the same; set weighting to houses, or "
                "turn secure_aggregation off"
            )
        if self.strategy in BUFFERED_STRATEGIES:
            raise ValueError(
                f"strategy {self.strategy} with secure_aggregation: it needs each doorbell's "
                "update, and with secure aggregation the aggregator only ever sees the sum of "
                "a round; use fedavg or clipped (each doorbell then clips its own update to "
                "secure_clip_norm), or turn secure_aggregation off"
            )
        if self.max_devices is not None and self.max_devices < self.min_cohort:
            raise ValueError(
                f"max_devices {self.max_devices} is below min_cohort {self.min_cohort}: "
                "no secure round could ever be unmasked"
            )

    @property
    def quorum(self) -> int:
        """Fewest updates a round needs: min_updates, and min_cohort for a secure round."""
        if self.secure_aggregation:
            return max(self.min_updates, self.min_cohort)
        return self.min_updates

    @property
    def server_lr(self) -> float:
        if self.server_learning_rate is not None:
            return self.server_learning_rate
        return DEFAULT_SERVER_LR.get(self.server_optimizer, 1.0)


class EvaluationSettings(StrictModel):
    strangers: Path | None = None
    """A `<person>/<image>` folder of real photos of people in no house (one photo each is enough):
    half calibrates the unknown-visitor threshold (ringing at pretend houses of the held-out people
    in `dataset`), half scores it."""
    max_strangers: int = Field(default=1000, ge=40)
    """At most this many stranger photos (a fixed sample): enough for a 1 % rate, and their faces
    are run through the backbone at start."""
    dataset: Path | None = None
    """A `<person>/<image>` folder of people in no house: each is enrolled from up to 5 photos and
    probed with the rest, for the open-set accuracy of every version; with gallery_size or more of
    them, they are also the pretend residents the threshold is calibrated at (else other strangers'
    single photos stand in: a laxer threshold)."""
    target_false_accept: float = Field(default=0.01, ge=0, lt=1)
    """Share of strangers ringing at a house of gallery_size people that may be taken for one of
    them."""
    gallery_size: int = Field(default=5, ge=1, le=100)
    """The house size the threshold is calibrated for: more people enrolled means more chances for a
    stranger to resemble one."""
    default_threshold: Cosine = DEFAULT_THRESHOLD
    """Cosine similarity threshold published when there is no stranger folder."""
    require_calibration: bool = False
    """A real site (deploy/templates/aggregator.yaml sets it): without `strangers` to calibrate a
    head's threshold and `dataset` to gate it, version 0 ships the measured START_HEAD_THRESHOLD
    instead of default_threshold, and each trained version is calibrated by the doorbells (with
    secure_aggregation: a calibration round over their stranger stores, aggregator/calibration.py)
    or, without secure rounds, not published (the round is abandoned, `uncalibrated`, one log line
    says what to give). Off for tests and demos of generated faces."""
    detector: Literal["blazeface", "haar"] = "blazeface"
    """Finds the faces in the evaluation photos (Haar if BlazeFace cannot load)."""


class AggregatorConfig(StrictModel):
    site: SiteId
    """The federation (house) this aggregator runs."""
    mqtt: MqttSettings | TierMqttSettings = Field(default_factory=MqttSettings)
    """Broker connection: the house's Mosquitto (MQTT 5), or with `protocol: "3.1.1"` and
    `failover` the clustered federation tier (docs/many-houses.md)."""
    signing: SigningSettings = Field(default_factory=SigningSettings)
    """Aggregator key and trusted device keys."""
    state_dir: Path
    """Folder of the round state and the current global model."""
    cache_dir: Path | None = None
    """The converted backbone and the evaluation photos' features (they take minutes to compute, and
    are the same for every lineage); default: state_dir/cache."""
    rounds: RoundSettings = Field(default_factory=RoundSettings)
    """How rounds are run."""
    auto_rounds: Count = 0
    """Run this many rounds back to back after start-up."""
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    """Held-out data."""
    threads: Threads = 2
    """Cores the backbone (LiteRT) and the one-off TFLite conversion may use."""
    persist_interval_s: Seconds = 0.5
    """Accepted updates are written to the state folder at most this long after they arrive (sooner
    when half of receive_maximum waits); the broker keeps them until then and redelivers them after
    a crash."""
    receive_maximum: int = Field(default=1000, ge=2, le=65535)
    """MQTT v5 Receive Maximum: the broker sends at most this many QoS 1 messages the aggregator has
    not acknowledged yet (it acks after persisting, so this must cover persist_interval_s of uploads
    or the broker pauses)."""
    inbox_size: int = Field(default=32, ge=1, le=10000)
    """Received messages waiting to be handled; when full, the MQTT thread stops reading and TCP
    holds the broker back. Bounds the aggregator's memory to about this many updates however many
    doorbells upload at once."""
    inbox_per_sender: int = Field(default=4, ge=1, le=1000)
    """Messages of one topic (one doorbell's updates, its statuses) that may wait; more are dropped
    at once and counted (backlog_full), so one login flooding junk cannot fill the inbox, stall the
    MQTT thread and make the broker drop the others' updates (aggregator/inbox.py)."""
