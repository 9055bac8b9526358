//! report.md: the run's stages, losses and health by epoch, and its warnings.

use super::{Run, Summary};
use crate::checkpoint;
use crate::metrics;
use crate::run_dir::{CHECKPOINT_DIR, CONFIG_FILE, METRICS_FILE, PLOT_FILE, REPORT_FILE};
use anyhow::Result;
use serde_json::Value;
use std::path::Path;

impl Run {
    /// Writes the loss plot and the report.
    pub(super) fn finish(&self, run_dir: &Path, seconds: f64, steps: usize) -> Result<Summary> {
        let records = metrics::read_records(&run_dir.join(METRICS_FILE))?;
        metrics::plot_losses(&records, &run_dir.join(PLOT_FILE))?;
        let mut stages = Vec::new();
        let mut report = String::new();
        report.push_str(&format!("# medssl run `{}`\n\n", run_dir.display()));
        report.push_str(&format!(
            "- device: {:?}\n- samples: {} (global ids over sources {})\n- steps: {steps}\n- wall time of this invocation: {seconds:.1} s\n- encoder: {}, aggregator: {}\n\n",
            self.device,
            self.data.num_samples(),
            self.data.sources.keys().join(", "),
            self.cfg.section("encoder", "name").map(|s| s.name).unwrap_or_default(),
            self.cfg.run.aggregator.as_ref().and_then(|_| self.cfg.section("aggregator", "name").ok()).map(|s| s.name).unwrap_or_else(|| "none".into()),
        ));
        for module in &self.untrained {
            report.push_str(&format!("- warning: {module}\n"));
        }
        if !self.untrained.is_empty() {
            report.push('\n');
        }
        report.push_str(
            "| stage | epochs | steps an epoch (batch) | objectives (weight) | first loss | last loss |\n|---|---|---|---|---|---|\n",
        );
        let stage_records: Vec<Vec<_>> = (0..self.cfg.run.stages.len())
            .map(|i| {
                records
                    .iter()
                    .filter(|r| r.get("stage_index").and_then(Value::as_u64) == Some(i as u64))
                    .cloned()
                    .collect()
            })
            .collect();
        for ((stage, stage_records), data) in self.cfg.run.stages.iter().zip(&stage_records).zip(&self.stage_data) {
            let w = (stage_records.len() / 10).max(1);
            let loss = metrics::first_and_last_mean(stage_records, "loss", w);
            stages.push((stage.name.clone(), loss));
            let objectives: Vec<String> = stage.objectives.iter().map(|(k, w)| format!("{k} ({w})")).collect();
            let (first, last) = match loss {
                Some((a, b)) => (format!("{a:.4}"), format!("{b:.4}")),
                None => ("—".to_string(), "—".to_string()),
            };
            report.push_str(&format!(
                "| {} | {} | {} ({}) | {} | {} | {} |\n",
                stage.name,
                stage.epochs,
                data.steps_per_epoch(),
                data.batch_size(),
                objectives.join(", "),
                first,
                last
            ));
        }
        report.push_str(&format!(
            "\nFirst and last loss are means over the first and last tenth of the logged steps. Losses and health signals: [{PLOT_FILE}]({PLOT_FILE}) (below); every step: `{METRICS_FILE}`; config: `{CONFIG_FILE}`; weights: `{CHECKPOINT_DIR}/`.\n"
        ));
        report.push_str(&format!("\n![losses and health signals by step]({PLOT_FILE})\n"));
        // Collapse and stalled clustering show over epochs, not in the first and last loss.
        report.push_str(
            "\n## Health by epoch\n\nMeans over each epoch's logged steps: the loss, its terms (`loss/<objective>/...`), the objectives' health signals (`health/<objective>/...`: e.g. a clustering objective's code entropy, at most log K, and prototypes used by the batch) and the embeddings' per-dimension std (`health/..._embedding_std`, about 1/sqrt(d) when spread evenly over the sphere, 0 when collapsed).\n",
        );
        for (stage, stage_records) in self.cfg.run.stages.iter().zip(&stage_records) {
            let table = metrics::epoch_table(stage_records);
            if !table.is_empty() {
                report.push_str(&format!("\n### Stage `{}`\n\n{table}", stage.name));
            }
        }
        checkpoint::write_atomic(&run_dir.join(REPORT_FILE), report.as_bytes())?;
        Ok(Summary {
            run_dir: run_dir.to_path_buf(),
            steps,
            stages,
            seconds,
        })
    }
}
