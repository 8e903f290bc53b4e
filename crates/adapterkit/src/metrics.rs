//! Evaluation metrics, computed as scikit-learn and SciPy compute them (the tests check this),
//! except that a metric that is undefined for its input (empty input, a constant series for a
//! correlation) is 0.0 instead of NaN, so that reports stay plain numbers.
//!
//! Classes are indices in `0..num_classes`. The functions panic if `pred` and `gold` differ in
//! length or a class index is out of range: those are bugs in the caller, not bad data.

use std::collections::BTreeMap;

/// Named metric values, sorted by name; serialises as a JSON object.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Metrics(pub BTreeMap<String, f64>);

impl Metrics {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).copied()
    }

    fn of(values: &[(&str, f64)]) -> Self {
        Self(
            values
                .iter()
                .map(|&(name, value)| (name.to_owned(), value))
                .collect(),
        )
    }
}

impl std::fmt::Display for Metrics {
    /// `accuracy=0.9123 macro_f1=0.8877 ...`, for logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut separator = "";
        for (name, value) in &self.0 {
            write!(f, "{separator}{name}={value:.4}")?;
            separator = " ";
        }
        Ok(())
    }
}

/// Accuracy, macro F1 and MCC of a single-label classifier.
pub fn classification_metrics(pred: &[usize], gold: &[usize], num_classes: usize) -> Metrics {
    Metrics::of(&[
        ("accuracy", accuracy(pred, gold)),
        ("macro_f1", macro_f1(pred, gold, num_classes)),
        ("mcc", mcc(pred, gold, num_classes)),
    ])
}

/// Pearson and Spearman correlations and the mean squared error of a regressor.
pub fn regression_metrics(pred: &[f64], gold: &[f64]) -> Metrics {
    check_lengths(pred.len(), gold.len());
    let mse = mean(
        pred.iter().zip(gold).map(|(p, g)| (p - g) * (p - g)),
        pred.len(),
    );
    Metrics::of(&[
        ("pearson", pearson(pred, gold)),
        ("spearman", spearman(pred, gold)),
        ("mse", mse),
    ])
}

/// Subset accuracy (every label of an example right) and micro and macro F1 of a multi-label
/// classifier; see [`multilabel_f1`].
pub fn multilabel_metrics(pred: &[Vec<bool>], gold: &[Vec<bool>]) -> Metrics {
    let (micro_f1, macro_f1) = multilabel_f1(pred, gold);
    let exact = pred.iter().zip(gold).filter(|(p, g)| p == g).count();
    Metrics::of(&[
        ("subset_accuracy", ratio(exact, pred.len())),
        ("micro_f1", micro_f1),
        ("macro_f1", macro_f1),
    ])
}

/// The fraction of predictions equal to the gold class.
pub fn accuracy(pred: &[usize], gold: &[usize]) -> f64 {
    check_lengths(pred.len(), gold.len());
    let right = pred.iter().zip(gold).filter(|(p, g)| p == g).count();
    ratio(right, pred.len())
}

/// The mean of the per-class F1 scores, over the classes that occur in `pred` or `gold`. A
/// class absent from both is skipped rather than counted as 0, as scikit-learn's
/// `f1_score(average="macro")` does by default: an evaluation set that happens to lack a class
/// says nothing about it. A class that occurs but is never predicted right scores 0.
pub fn macro_f1(pred: &[usize], gold: &[usize], num_classes: usize) -> f64 {
    let counts = confusion(pred, gold, num_classes);
    let scores: Vec<f64> = (0..num_classes)
        .filter(|&c| counts.predicted[c] + counts.actual[c] > 0)
        .map(|c| {
            let tp = counts.matrix[c][c];
            f1(tp, counts.predicted[c] - tp, counts.actual[c] - tp)
        })
        .collect();
    mean(scores.iter().copied(), scores.len())
}

/// The Matthews correlation coefficient, in its multiclass form (Gorodkin 2004), as
/// `sklearn.metrics.matthews_corrcoef`; 0.0 when undefined (all predictions, or all gold
/// labels, of one class).
pub fn mcc(pred: &[usize], gold: &[usize], num_classes: usize) -> f64 {
    let counts = confusion(pred, gold, num_classes);
    let samples = pred.len() as f64;
    let correct = (0..num_classes)
        .map(|c| counts.matrix[c][c] as f64)
        .sum::<f64>();
    let dot = |a: &[usize], b: &[usize]| {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| x as f64 * y as f64)
            .sum::<f64>()
    };
    let numerator = correct * samples - dot(&counts.predicted, &counts.actual);
    let denominator = ((samples * samples - dot(&counts.predicted, &counts.predicted))
        * (samples * samples - dot(&counts.actual, &counts.actual)))
    .sqrt();
    if denominator == 0.0 {
        0.0
    } else {
        numerator / denominator
    }
}

/// Pearson's correlation coefficient; 0.0 when either series is constant or has fewer than
/// two values (SciPy gives NaN there).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    check_lengths(x.len(), y.len());
    let n = x.len();
    if n < 2 {
        return 0.0;
    }
    let (mean_x, mean_y) = (mean(x.iter().copied(), n), mean(y.iter().copied(), n));
    let (mut xy, mut xx, mut yy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (dx, dy) = (a - mean_x, b - mean_y);
        xy += dx * dy;
        xx += dx * dx;
        yy += dy * dy;
    }
    if xx == 0.0 || yy == 0.0 {
        return 0.0;
    }
    // Rounding can push a perfect correlation a hair past 1.
    (xy / (xx * yy).sqrt()).clamp(-1.0, 1.0)
}

/// Spearman's rank correlation: Pearson's on the ranks, tied values sharing their average
/// rank, as `scipy.stats.spearmanr`.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    check_lengths(x.len(), y.len());
    pearson(&ranks(x), &ranks(y))
}

/// Micro and macro F1 over the labels of a multi-label classifier (one `bool` per label and
/// example). Micro pools every (example, label) decision; macro averages the per-label F1 over
/// the labels that occur in `pred` or `gold`, skipping the others as [`macro_f1`] does.
pub fn multilabel_f1(pred: &[Vec<bool>], gold: &[Vec<bool>]) -> (f64, f64) {
    check_lengths(pred.len(), gold.len());
    let width = gold.first().map_or(0, Vec::len);
    // Per label: true positives, false positives, false negatives.
    let mut counts = vec![(0, 0, 0); width];
    for (p, g) in pred.iter().zip(gold) {
        assert!(
            p.len() == width && g.len() == width,
            "every example must have {width} labels, found {} predicted and {} gold",
            p.len(),
            g.len()
        );
        for (label, (&p, &g)) in p.iter().zip(g).enumerate() {
            let (tp, fp, fn_) = &mut counts[label];
            match (p, g) {
                (true, true) => *tp += 1,
                (true, false) => *fp += 1,
                (false, true) => *fn_ += 1,
                (false, false) => {}
            }
        }
    }
    let (tp, fp, fn_) = counts.iter().fold((0, 0, 0), |(a, b, c), &(tp, fp, fn_)| {
        (a + tp, b + fp, c + fn_)
    });
    let scores: Vec<f64> = counts
        .iter()
        .filter(|&&(tp, fp, fn_)| tp + fp + fn_ > 0)
        .map(|&(tp, fp, fn_)| f1(tp, fp, fn_))
        .collect();
    (f1(tp, fp, fn_), mean(scores.iter().copied(), scores.len()))
}

/// Counts of a single-label classifier's decisions: `matrix[predicted][actual]`, and the
/// number of predictions and of gold labels of each class.
struct Confusion {
    matrix: Vec<Vec<usize>>,
    predicted: Vec<usize>,
    actual: Vec<usize>,
}

fn confusion(pred: &[usize], gold: &[usize], num_classes: usize) -> Confusion {
    check_lengths(pred.len(), gold.len());
    let mut counts = Confusion {
        matrix: vec![vec![0; num_classes]; num_classes],
        predicted: vec![0; num_classes],
        actual: vec![0; num_classes],
    };
    for (&p, &g) in pred.iter().zip(gold) {
        assert!(
            p < num_classes && g < num_classes,
            "class index out of range: predicted {p}, gold {g}, with {num_classes} classes"
        );
        counts.matrix[p][g] += 1;
        counts.predicted[p] += 1;
        counts.actual[g] += 1;
    }
    counts
}

/// F1 from counts, 2 tp / (2 tp + fp + fn): the harmonic mean of precision and recall, and 0
/// where either is undefined, as scikit-learn's default `zero_division` gives.
fn f1(tp: usize, fp: usize, fn_: usize) -> f64 {
    ratio(2 * tp, 2 * tp + fp + fn_)
}

/// 1-based ranks, tied values all getting the mean of the ranks they span.
fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        // Positions start..end hold ranks start+1 ..= end; their mean:
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

fn check_lengths(pred: usize, gold: usize) {
    assert_eq!(pred, gold, "{pred} predictions for {gold} gold values");
}

fn ratio(numerator: usize, denominator: usize) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator as f64 / denominator as f64
    }
}

fn mean(values: impl Iterator<Item = f64>, count: usize) -> f64 {
    if count == 0 {
        0.0
    } else {
        values.sum::<f64>() / count as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expected values come from scikit-learn 1.9.1 and SciPy 1.17.1; each test shows the
    /// Python that printed them (with `from sklearn.metrics import *` and
    /// `from scipy.stats import pearsonr, spearmanr`).
    fn close(actual: f64, expected: f64) {
        assert!(
            (actual - expected).abs() < 1e-9,
            "{actual} is not {expected}"
        );
    }

    // Class 2 occurs in gold but is never predicted; class 3 (of num_classes 4) occurs nowhere.
    const GOLD: [usize; 8] = [0, 0, 1, 1, 2, 2, 0, 1];
    const PRED: [usize; 8] = [0, 1, 1, 1, 0, 1, 0, 0];

    #[test]
    fn classification_matches_sklearn_with_a_class_never_predicted() {
        let m = classification_metrics(&PRED, &GOLD, 4);
        // accuracy_score([0,0,1,1,2,2,0,1], [0,1,1,1,0,1,0,0])
        close(m.get("accuracy").unwrap(), 0.5);
        // f1_score([0,0,1,1,2,2,0,1], [0,1,1,1,0,1,0,0], average='macro')
        close(m.get("macro_f1").unwrap(), 0.38095238095238093);
        // matthews_corrcoef([0,0,1,1,2,2,0,1], [0,1,1,1,0,1,0,0])
        close(m.get("mcc").unwrap(), 0.2182178902359924);
        assert_eq!(m.0.len(), 3);
    }

    #[test]
    fn binary_matches_sklearn() {
        let gold = [1, 0, 1, 1, 0, 0, 1];
        let pred = [1, 0, 0, 1, 1, 0, 1];
        // f1_score([1,0,1,1,0,0,1], [1,0,0,1,1,0,1], average='macro')
        close(macro_f1(&pred, &gold, 2), 0.7083333333333333);
        // matthews_corrcoef([1,0,1,1,0,0,1], [1,0,0,1,1,0,1])
        close(mcc(&pred, &gold, 2), 0.4166666666666667);
    }

    #[test]
    fn one_predicted_class_gives_mcc_zero() {
        let gold = [0, 1, 2, 1];
        let pred = [1, 1, 1, 1];
        // matthews_corrcoef([0,1,2,1], [1,1,1,1])
        close(mcc(&pred, &gold, 3), 0.0);
        // f1_score([0,1,2,1], [1,1,1,1], average='macro')
        close(macro_f1(&pred, &gold, 3), 0.2222222222222222);
        // matthews_corrcoef([0,1,2,1], [0,1,2,1])
        close(mcc(&gold, &gold, 3), 1.0);
    }

    #[test]
    fn pearson_matches_scipy() {
        // pearsonr([1,2,3,4,5.5], [2,1,4,3,7]).statistic
        close(
            pearson(&[1.0, 2.0, 3.0, 4.0, 5.5], &[2.0, 1.0, 4.0, 3.0, 7.0]),
            0.8580868382401787,
        );
        // A constant series: SciPy gives nan (with a warning); we give 0.0.
        close(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), 0.0);
    }

    #[test]
    fn spearman_averages_tied_ranks_as_scipy() {
        let x = [1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 4.0, 5.0];
        let y = [3.0, 1.0, 2.0, 2.0, 5.0, 4.0, 6.0, 6.0];
        // spearmanr([1,2,2,3,4,4,4,5], [3,1,2,2,5,4,6,6]).statistic
        close(spearman(&x, &y), 0.7889568540593018);
        assert_eq!(ranks(&x), [1.0, 2.5, 2.5, 4.0, 6.0, 6.0, 6.0, 8.0]);
    }

    #[test]
    fn regression_metrics_match_sklearn() {
        let m = regression_metrics(&[3.0, -0.5, 2.0, 7.0], &[2.5, 0.0, 2.0, 8.0]);
        // mean_squared_error([2.5,0,2,8], [3,-0.5,2,7])
        close(m.get("mse").unwrap(), 0.375);
        // pearsonr([3,-0.5,2,7], [2.5,0,2,8]).statistic
        close(m.get("pearson").unwrap(), 0.98486961844827);
        // spearmanr([3,-0.5,2,7], [2.5,0,2,8]).statistic
        close(m.get("spearman").unwrap(), 1.0);
    }

    #[test]
    fn multilabel_matches_sklearn_skipping_an_absent_label() {
        let rows = |rows: &[[u8; 4]]| -> Vec<Vec<bool>> {
            rows.iter()
                .map(|r| r.iter().map(|&v| v == 1).collect())
                .collect()
        };
        // Label 3 occurs nowhere; label 2 is predicted once, wrongly.
        let gold = rows(&[
            [1, 0, 1, 0],
            [0, 1, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 1, 0],
            [1, 0, 0, 0],
        ]);
        let pred = rows(&[
            [1, 0, 0, 0],
            [0, 1, 1, 0],
            [1, 1, 0, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 0],
        ]);
        let m = multilabel_metrics(&pred, &gold);
        // G=np.array([[1,0,1,0],[0,1,0,0],[1,1,0,0],[0,0,1,0],[1,0,0,0]])
        // P=np.array([[1,0,0,0],[0,1,1,0],[1,1,0,0],[0,0,0,0],[0,0,0,0]])
        // f1_score(G, P, average='micro')
        close(m.get("micro_f1").unwrap(), 0.6666666666666666);
        // f1_score(G, P, average='macro', labels=[0,1,2])
        close(m.get("macro_f1").unwrap(), 0.6);
        // accuracy_score(G, P)
        close(m.get("subset_accuracy").unwrap(), 0.2);
    }

    #[test]
    fn empty_input_scores_zero() {
        close(accuracy(&[], &[]), 0.0);
        close(macro_f1(&[], &[], 3), 0.0);
        close(mcc(&[], &[], 3), 0.0);
        close(spearman(&[], &[]), 0.0);
        assert_eq!(multilabel_f1(&[], &[]), (0.0, 0.0));
    }

    #[test]
    fn metrics_serialise_as_an_object_and_print_sorted() {
        let m = Metrics::of(&[("mcc", 0.5), ("accuracy", 0.25)]);
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"accuracy":0.25,"mcc":0.5}"#
        );
        assert_eq!(m.to_string(), "accuracy=0.2500 mcc=0.5000");
    }
}
