//! A CUDA backend that shows each batch it runs, and the statistics it
//! returns, to a tap: how the CUDA tests watch a decode from outside.

use dllm::backend::{Backend, CacheLayout, ForwardPass, PassShapes, TokenStats};
use dllm::cuda::CudaBackend;

pub type Tap = Box<dyn FnMut(&[ForwardPass], &[Vec<TokenStats>])>;

pub struct Tapped {
    pub cuda: CudaBackend,
    pub tap: Tap,
}

impl Backend for Tapped {
    fn device_name(&self) -> String {
        self.cuda.device_name()
    }

    fn cache_slot_bytes(&self) -> usize {
        self.cuda.cache_slot_bytes()
    }

    fn cache_budget(&self) -> dllm::Result<usize> {
        self.cuda.cache_budget()
    }

    fn allocate_cache(&mut self, layout: CacheLayout) -> dllm::Result<()> {
        self.cuda.allocate_cache(layout)
    }

    fn expect(&mut self, shapes: &PassShapes) -> dllm::Result<()> {
        self.cuda.expect(shapes)
    }

    fn logits(&mut self, _: &[ForwardPass]) -> dllm::Result<Vec<Vec<f32>>> {
        unreachable!("the decode loop asks for token statistics only")
    }

    fn token_stats(&mut self, passes: &[ForwardPass]) -> dllm::Result<Vec<Vec<TokenStats>>> {
        let stats = self.cuda.token_stats(passes)?;
        (self.tap)(passes, &stats);
        Ok(stats)
    }
}
