/* Memory probe (not a test, not part of the package): how fast can one core read the tiles a
 * keep-1/8 sparse decode step selects, in vLLM's CPU "vec" cache layout with fp32 (per block of
 * 128 tokens and KV head: K^T 32 KiB, a 16-token tile's K is one 64-byte line per channel, 512
 * bytes apart; then V 32 KiB, a tile's V one contiguous 4 KiB run), against a sequential sweep
 * of the whole layer? 3 KV heads, shuffled block tables, sinks + window + random tiles, ~1 GiB
 * of layers cycled so every read is cold, huge pages (madvise); loads summed, no q.k or p.v.
 * Medians of 41 rounds, thread CPU time. Needs AVX2.
 *
 *   gcc -O2 -march=native -o /tmp/read_probe_vec bench/kernels/read_probe_vec.c && /tmp/read_probe_vec [CONTEXT]
 *
 * Measured 2026-12-04 on an AMD EPYC (AVX2 only), 8k context: ~145 us for the tiles (with or
 * without prefetches) vs ~715 us for every line; the fused kernel took ~270 us there cold
 * (docs/cpu-kernels.md). */
#define _GNU_SOURCE
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#define HKV 3
#define B 128
#define D 64
#define T 16
#define REG (2 * D * B * 4) /* K^T 32K + V 32K per (block, head), fp32 */
static double now(void){struct timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+1e-9*t.tv_nsec;}
static int cmp(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
int main(int argc,char**argv){
  int ctx = argc>1?atoi(argv[1]):8192; int nb = ctx/B; int tiles = ctx/T; int keep = tiles/8;
  size_t layer = (size_t)nb*HKV*REG; int L = (int)((1ull<<30)/layer); if(L<2)L=2;
  char* mem = aligned_alloc(2<<20, layer*L); madvise(mem, layer*L, MADV_HUGEPAGE);
  memset(mem, 1, layer*L);
  int* bt = malloc(sizeof(int)*nb*L); /* shuffled block tables per layer */
  for(int l=0;l<L;l++){for(int i=0;i<nb;i++)bt[l*nb+i]=i; for(int i=nb-1;i>0;i--){int j=rand()%(i+1);int t=bt[l*nb+i];bt[l*nb+i]=bt[l*nb+j];bt[l*nb+j]=t;}}
  int* sel = malloc(sizeof(int)*HKV*keep); /* per head sorted tile ids: 2 sinks, 10 window, random */
  for(int h=0;h<HKV;h++){char* m=calloc(tiles,1); int k=0; for(int t=0;t<2;t++){m[t]=1;k++;} for(int t=tiles-10;t<tiles;t++){m[t]=1;k++;}
    while(k<keep){int t=rand()%tiles; if(!m[t]){m[t]=1;k++;}} k=0; for(int t=0;t<tiles;t++) if(m[t]) sel[h*keep+k++]=t; free(m);}
  int R=41; double ts[4][64]; volatile float sink=0;
  for(int r=0;r<R;r++){
    for(int mode=0; mode<4; mode++){
      int l = (r*4+mode)%L; char* base = mem + (size_t)l*layer; int* b = bt + l*nb;
      double t0=now(); __m256 acc=_mm256_setzero_ps();
      if(mode==3){ /* sequential: every block, K then V */
        for(int i=0;i<nb;i++) for(int h=0;h<HKV;h++){ char* rg = base + ((size_t)b[i]*HKV+h)*REG;
          for(int o=0;o<REG;o+=64) acc=_mm256_add_ps(acc,_mm256_load_ps((float*)(rg+o))); }
      } else for(int h=0;h<HKV;h++) for(int j=0;j<keep;j++){
        int t = sel[h*keep+j]; char* rg = base + ((size_t)b[t/(B/T)]*HKV+h)*REG; int tt = t%(B/T);
        char* K = rg + tt*64; char* V = rg + D*B*4 + tt*T*D*4;
        if(mode>=1 && j+1<keep){ int t2=sel[h*keep+j+1]; char* rg2 = base + ((size_t)b[t2/(B/T)]*HKV+h)*REG; int t22=t2%(B/T);
          char* K2 = rg2 + t22*64; char* V2 = rg2 + D*B*4 + t22*T*D*4;
          for(int d=0; d<D; d++){ _mm_prefetch(K2 + d*B*4, _MM_HINT_T0); }
          for(int o=0;o<T*D*4;o+=64) _mm_prefetch(V2+o, _MM_HINT_T0); }
        if(mode==2 && j+4<keep){ int t2=sel[h*keep+j+4]; char* rg2 = base + ((size_t)b[t2/(B/T)]*HKV+h)*REG; int t22=t2%(B/T);
          char* K2 = rg2 + t22*64; for(int d=0; d<D; d+=8) _mm_prefetch(K2 + d*B*4, _MM_HINT_T1); }
        for(int d=0; d<D; d++){ acc=_mm256_add_ps(acc,_mm256_load_ps((float*)(K+d*B*4))); acc=_mm256_add_ps(acc,_mm256_load_ps((float*)(K+d*B*4+32)));}
        for(int o=0;o<T*D*4;o+=32) acc=_mm256_add_ps(acc,_mm256_load_ps((float*)(V+o)));
      }
      ts[mode][r]=now()-t0; float f[8]; _mm256_storeu_ps(f,acc); sink+=f[0];
    }
  }
  const char* nm[4]={"tiles, no prefetch","tiles, next-tile T0 prefetch","tiles, + far K T1","sequential all (vLLM bytes)"};
  for(int m=0;m<4;m++){qsort(ts[m],R,sizeof(double),cmp); printf("%-32s %8.1f us\n",nm[m],1e6*ts[m][R/2]);}
  printf("layers cycled %d, keep %d tiles/head, bytes tiles %.2f MB, all %.2f MB\n",L,keep,HKV*keep*T*D*8/1e6,(double)layer/1e6);
  return 0;
}
