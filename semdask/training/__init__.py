"""Training: the ``train`` arrow, reading patches lazily from the stores.

Seeded samplers that yield coordinates (:mod:`.samplers`), the lazy patch dataset
(:mod:`.dataset`), batched augmentation (:mod:`.augment`), losses (:mod:`.losses`),
checkpoints (:mod:`.checkpoint`), training at one pixel size (:mod:`.scale`), the loop
(:mod:`.train`), self-supervised pretraining on unlabelled mosaics (:mod:`.pretrain`) and
loading its weights (:mod:`.transfer`).
"""
