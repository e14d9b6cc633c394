D=/tmp/fz/bench/data
alfk simulate --pool $D/pool --val $D/val --test $D/test --out /tmp/fz/proto/out \
  --arch resnet10 --freeze backbone --init pretrain --pretrain-epochs 4 \
  --strategies random,entropy,fk,fk:true --rounds 10 --P 50 --epochs 30 --eval-every 5 \
  --seeds 0 --imbalance 10 --rare dog,frog,horse,ship,truck --device cpu --no-plot
