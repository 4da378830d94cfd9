//! TEMPORARY placeholder, replaced by the strategies work item.
use super::{BackendId, PoolView, RequestInfo, Strategy};
/// placeholder
#[derive(Debug, Default)]
pub struct WeightedRandom;
impl WeightedRandom { /// placeholder
pub fn new(_b: &[crate::Backend]) -> Self { Self } }
impl Strategy for WeightedRandom { fn name(&self) -> &'static str { "x" } fn pick(&self, _r: &RequestInfo, p: &PoolView<'_>) -> Option<BackendId> { p.next_eligible_from(0) } }
