pub struct ExtractionConfig; pub struct AttnHeads; pub struct LayerHead;
