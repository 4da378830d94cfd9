//! TEMPORARY placeholder, replaced by the strategies work item.
use super::{BackendId, PoolView, RequestInfo, Strategy};
/// placeholder
#[derive(Debug, Default)]
pub struct LeastConnections;
impl LeastConnections { /// placeholder
pub fn new() -> Self { Self } }
impl Strategy for LeastConnections { fn name(&self) -> &'static str { "x" } fn pick(&self, _r: &RequestInfo, p: &PoolView<'_>) -> Option<BackendId> { p.next_eligible_from(0) } }
