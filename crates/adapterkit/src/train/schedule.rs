//! Learning-rate schedule: linear warm-up from 0, then linear decay to 0 (the Houlsby paper's
//! recipe and `transformers`' `get_linear_schedule_with_warmup`).

#[derive(Debug, Clone, Copy)]
pub struct LinearSchedule {
    pub peak: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LinearSchedule {
    pub fn new(peak: f64, total_steps: usize, warmup_ratio: f64) -> Self {
        Self {
            peak,
            warmup_steps: (total_steps as f64 * warmup_ratio).ceil() as usize,
            total_steps,
        }
    }

    /// The rate for optimizer step `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let remaining = self.total_steps.saturating_sub(step) as f64;
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        self.peak * (remaining / decay_steps).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_to_zero() {
        let s = LinearSchedule::new(1e-3, 100, 0.1);
        assert_eq!(s.warmup_steps, 10);
        assert_eq!(s.at(0), 0.0);
        assert!((s.at(5) - 5e-4).abs() < 1e-12);
        assert!((s.at(10) - 1e-3).abs() < 1e-12);
        assert!((s.at(55) - 5e-4).abs() < 1e-12);
        assert_eq!(s.at(100), 0.0);
    }
}
