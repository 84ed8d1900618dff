/* The daemon's last-value cache and its feed loop, compiled.
 *
 * Why this exists: the daemon forwards in libzmq (zmq_proxy_steerable), and its last-value
 * cache reads its own copy of the stream from an inproc SUB. Read from Python, that copy
 * cost ~2 us of interpreter time per event (two zmq.Frame objects, bytes copies, a dict
 * update): flat out, the daemon spent 2-2.5x the CPU of a bare zmq.proxy. This file does
 * the same work in C: receive, the same structural checks, the same bounded cache. It is
 * loaded with ctypes by bus/cache.py, which falls back to the Python loop when this
 * library was not built (no C compiler at install time) or libzmq cannot be found.
 *
 * No zmq.h and no Python.h: pyzmq's wheel bundles libzmq without headers, so bus/cache.py
 * hands over the addresses of the six libzmq functions used here, taken from the libzmq
 * the process already has loaded (the one pyzmq's sockets live in). zmq_msg_t is part of
 * libzmq's stable ABI: 64 opaque bytes aligned like a pointer.
 *
 * The semantics mirror LastValueCache.feed in bus/cache.py exactly (a differential test in
 * tests/test_cache.py feeds both the same frames): per message, in this order,
 *   one frame only                  -> rejected "bad_frame_count"
 *   more than two frames            -> rejected "bad_frame_count" (all its frames read)
 *   topic + payload > max_size      -> rejected "too_large"
 *   payload empty or not a map      -> rejected "not_a_map"
 *   a new topic the checker refuses -> rejected "bad_topic"
 * otherwise the payload is copied into the topic's ring of the last `depth` payloads. A
 * copy, not the received zmq message: a message received over TCP may be a slice of
 * libzmq's shared 8 KiB receive buffer, and keeping it would keep that whole buffer.
 *
 * Single-threaded by contract: one thread (the daemon's main thread) calls every function.
 */

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    unsigned char opaque[64];
} __attribute__((aligned(sizeof(void *)))) tb_zmq_msg;

typedef int (*msg_init_fn)(tb_zmq_msg *);
typedef int (*msg_close_fn)(tb_zmq_msg *);
typedef int (*msg_recv_fn)(tb_zmq_msg *, void *, int);
typedef void *(*msg_data_fn)(tb_zmq_msg *);
typedef size_t (*msg_size_fn)(const tb_zmq_msg *);
typedef int (*msg_more_fn)(const tb_zmq_msg *);
/* Asked once per new topic: 1 if it is a valid topic (bus/protocol.py decides), else 0. */
typedef int (*topic_ok_fn)(const char *topic, size_t size);

static msg_init_fn zmq_msg_init_;
static msg_close_fn zmq_msg_close_;
static msg_recv_fn zmq_msg_recv_;
static msg_data_fn zmq_msg_data_;
static msg_size_fn zmq_msg_size_;
static msg_more_fn zmq_msg_more_;

#define TB_DONTWAIT 1 /* ZMQ_DONTWAIT */

enum { REJECT_BAD_FRAME_COUNT, REJECT_TOO_LARGE, REJECT_NOT_A_MAP, REJECT_BAD_TOPIC, N_REJECTS };

typedef struct {
    uint64_t arrival; /* global arrival number: snapshots come out in arrival order */
    size_t size;
    size_t capacity; /* of data: a slot's buffer is reused by the next payload that fits */
    char *data;
} tb_slot;

typedef struct tb_stream {
    struct tb_stream *bucket_next;
    struct tb_stream *older, *newer; /* least recently active first (eviction order) */
    uint64_t hash;
    double last_seen;
    char *topic;
    size_t topic_size;
    uint32_t head;  /* index of the oldest slot */
    uint32_t count; /* slots in use, <= depth */
    tb_slot slots[];
} tb_stream;

typedef struct {
    uint32_t depth;
    uint64_t max_streams;
    uint64_t n_streams;
    uint64_t arrivals;
    uint64_t evicted;
    uint64_t rejects[N_REJECTS];
    tb_stream **buckets;
    uint64_t n_buckets; /* a power of two */
    tb_stream *oldest, *newest;
    /* A snapshot being handed over: filled by tb_cache_snapshot_begin, read and freed by
     * tb_cache_snapshot_copy. */
    struct tb_item {
        uint64_t arrival;
        const tb_slot *slot;
        const tb_stream *stream;
    } *items;
    uint64_t n_items;
} tb_cache;

/* Counters handed to Python in one call, in this order. */
enum { STAT_STREAMS, STAT_EVICTED, STAT_REJECTS, N_STATS = STAT_REJECTS + N_REJECTS };

void tb_bind_libzmq(msg_init_fn init, msg_close_fn close, msg_recv_fn recv, msg_data_fn data,
                    msg_size_fn size, msg_more_fn more) {
    zmq_msg_init_ = init;
    zmq_msg_close_ = close;
    zmq_msg_recv_ = recv;
    zmq_msg_data_ = data;
    zmq_msg_size_ = size;
    zmq_msg_more_ = more;
}

/* Eight bytes at a time, each word mixed in by a multiply: a topic (~30 bytes) hashes in a
 * few cycles per word, where a byte-at-a-time hash (FNV-1a, the first version) was a chain
 * of 30 dependent multiplies on every event. Chaining resolves collisions; the table only
 * needs the bits spread. */
static uint64_t hash_bytes(const char *bytes, size_t size) {
    const uint64_t k = 0x9e3779b97f4a7c15ULL;
    uint64_t hash = size * k;
    while (size >= 8) {
        uint64_t word;
        memcpy(&word, bytes, 8);
        hash = (hash ^ word) * k;
        hash ^= hash >> 29;
        bytes += 8;
        size -= 8;
    }
    if (size) {
        uint64_t word = 0;
        memcpy(&word, bytes, size);
        hash = (hash ^ word) * k;
        hash ^= hash >> 29;
    }
    return hash ^ (hash >> 32);
}

tb_cache *tb_cache_new(uint32_t depth, uint64_t max_streams) {
    if (depth == 0)
        return NULL;
    tb_cache *cache = calloc(1, sizeof *cache);
    if (cache == NULL)
        return NULL;
    cache->depth = depth;
    cache->max_streams = max_streams;
    cache->n_buckets = 1024;
    cache->buckets = calloc(cache->n_buckets, sizeof *cache->buckets);
    if (cache->buckets == NULL) {
        free(cache);
        return NULL;
    }
    return cache;
}

static void unlink_recency(tb_cache *cache, tb_stream *stream) {
    if (stream->older)
        stream->older->newer = stream->newer;
    else
        cache->oldest = stream->newer;
    if (stream->newer)
        stream->newer->older = stream->older;
    else
        cache->newest = stream->older;
    stream->older = stream->newer = NULL;
}

static void append_recency(tb_cache *cache, tb_stream *stream) {
    stream->older = cache->newest;
    stream->newer = NULL;
    if (cache->newest)
        cache->newest->newer = stream;
    else
        cache->oldest = stream;
    cache->newest = stream;
}

static void free_stream(tb_cache *cache, tb_stream *stream) {
    for (uint32_t i = 0; i < cache->depth; i++)
        free(stream->slots[i].data); /* NULL in slots never used */
    free(stream->topic);
    free(stream);
}

/* Take a stream out of the table and the recency list, and free it. */
static void remove_stream(tb_cache *cache, tb_stream *stream) {
    tb_stream **link = &cache->buckets[stream->hash & (cache->n_buckets - 1)];
    while (*link != stream)
        link = &(*link)->bucket_next;
    *link = stream->bucket_next;
    unlink_recency(cache, stream);
    cache->n_streams--;
    free_stream(cache, stream);
}

static tb_stream *find_stream(const tb_cache *cache, const char *topic, size_t size, uint64_t hash) {
    for (tb_stream *s = cache->buckets[hash & (cache->n_buckets - 1)]; s; s = s->bucket_next)
        if (s->hash == hash && s->topic_size == size && memcmp(s->topic, topic, size) == 0)
            return s;
    return NULL;
}

static int grow_table(tb_cache *cache) {
    uint64_t n_buckets = cache->n_buckets * 2;
    tb_stream **buckets = calloc(n_buckets, sizeof *buckets);
    if (buckets == NULL)
        return -1;
    for (uint64_t i = 0; i < cache->n_buckets; i++) {
        tb_stream *s = cache->buckets[i];
        while (s) {
            tb_stream *next = s->bucket_next;
            tb_stream **bucket = &buckets[s->hash & (n_buckets - 1)];
            s->bucket_next = *bucket;
            *bucket = s;
            s = next;
        }
    }
    free(cache->buckets);
    cache->buckets = buckets;
    cache->n_buckets = n_buckets;
    return 0;
}

/* A new, empty stream as the most recently active one; beyond max_streams the least
 * recently active one is evicted (after inserting, like the Python cache). */
static tb_stream *add_stream(tb_cache *cache, const char *topic, size_t size, uint64_t hash) {
    if (cache->n_streams + 1 > cache->n_buckets - cache->n_buckets / 4 && grow_table(cache) < 0)
        return NULL;
    tb_stream *stream = calloc(1, sizeof *stream + cache->depth * sizeof(tb_slot));
    if (stream == NULL)
        return NULL;
    stream->topic = malloc(size ? size : 1);
    if (stream->topic == NULL) {
        free(stream);
        return NULL;
    }
    memcpy(stream->topic, topic, size);
    stream->topic_size = size;
    stream->hash = hash;
    tb_stream **bucket = &cache->buckets[hash & (cache->n_buckets - 1)];
    stream->bucket_next = *bucket;
    *bucket = stream;
    append_recency(cache, stream);
    cache->n_streams++;
    if (cache->n_streams > cache->max_streams) {
        remove_stream(cache, cache->oldest);
        cache->evicted++;
    }
    return stream;
}

/* Append a copy of the payload; a full ring overwrites its oldest. 0, or -1 out of memory.
 * The oldest slot's buffer takes the new payload in place when it fits and is less than
 * twice its size (a stream's payloads are about the same size, so flat out there is no
 * malloc/free per event); otherwise it is replaced by one of the payload's size, so one
 * large payload does not keep a large buffer for good. */
static int store_payload(tb_cache *cache, tb_stream *stream, const void *payload, size_t size) {
    tb_slot *slot;
    int full = stream->count == cache->depth;
    if (full)
        slot = &stream->slots[stream->head];
    else
        slot = &stream->slots[(stream->head + stream->count) % cache->depth];
    size_t needed = size ? size : 1;
    if (slot->data == NULL || slot->capacity < needed || slot->capacity / 2 > needed) {
        char *buffer = malloc(needed);
        if (buffer == NULL)
            return -1;
        free(slot->data);
        slot->data = buffer;
        slot->capacity = needed;
    }
    memcpy(slot->data, payload, size);
    if (full)
        stream->head = (stream->head + 1) % cache->depth;
    else
        stream->count++;
    slot->arrival = ++cache->arrivals;
    slot->size = size;
    return 0;
}

static int is_map_marker(unsigned char byte) {
    return (byte >= 0x80 && byte <= 0x8f) || byte == 0xde || byte == 0xdf;
}

/* Read and cache up to `limit` messages (limit < 0: until the socket has none queued).
 * Returns the messages read (each counted, cached or rejected), or -1 when out of memory
 * (the message being stored is lost; what was read before is accounted). `*frames` gets
 * the frames read. Never blocks: every receive is ZMQ_DONTWAIT. */
int64_t tb_cache_feed(tb_cache *cache, void *socket, int64_t limit, double now,
                      uint64_t max_size, topic_ok_fn topic_ok, uint64_t *frames) {
    tb_zmq_msg first, second;
    int64_t seen = 0;
    uint64_t n_frames = 0;
    int failed = 0;
    zmq_msg_init_(&first);
    zmq_msg_init_(&second);
    while (limit < 0 || seen < limit) {
        if (zmq_msg_recv_(&first, socket, TB_DONTWAIT) < 0)
            break; /* EAGAIN: nothing queued (or the context is ending) */
        seen++;
        n_frames++;
        if (!zmq_msg_more_(&first)) {
            cache->rejects[REJECT_BAD_FRAME_COUNT]++;
            continue;
        }
        /* A message's frames arrive together, so the rest is already queued. */
        if (zmq_msg_recv_(&second, socket, TB_DONTWAIT) < 0)
            break;
        n_frames++;
        if (zmq_msg_more_(&second)) {
            while (zmq_msg_more_(&second) && zmq_msg_recv_(&second, socket, TB_DONTWAIT) >= 0)
                n_frames++;
            cache->rejects[REJECT_BAD_FRAME_COUNT]++;
            continue;
        }
        size_t topic_size = zmq_msg_size_(&first);
        size_t payload_size = zmq_msg_size_(&second);
        if (topic_size + payload_size > max_size) {
            cache->rejects[REJECT_TOO_LARGE]++;
            continue;
        }
        const unsigned char *payload = zmq_msg_data_(&second);
        if (payload_size == 0 || !is_map_marker(payload[0])) {
            cache->rejects[REJECT_NOT_A_MAP]++;
            continue;
        }
        const char *topic = zmq_msg_data_(&first);
        uint64_t hash = hash_bytes(topic, topic_size);
        tb_stream *stream = find_stream(cache, topic, topic_size, hash);
        if (stream == NULL) {
            if (!topic_ok(topic, topic_size)) {
                cache->rejects[REJECT_BAD_TOPIC]++;
                continue;
            }
            stream = add_stream(cache, topic, topic_size, hash);
            if (stream == NULL) {
                failed = 1;
                break;
            }
        } else if (stream != cache->newest) {
            unlink_recency(cache, stream);
            append_recency(cache, stream);
        }
        stream->last_seen = now;
        if (store_payload(cache, stream, payload, payload_size) < 0) {
            failed = 1;
            break;
        }
    }
    zmq_msg_close_(&first);
    zmq_msg_close_(&second);
    *frames = n_frames;
    return failed ? -1 : seen;
}

/* Drop the streams silent for longer than idle_s (least recently active first). */
uint64_t tb_cache_evict_idle(tb_cache *cache, double now, double idle_s) {
    uint64_t dropped = 0;
    while (cache->oldest && now - cache->oldest->last_seen > idle_s) {
        remove_stream(cache, cache->oldest);
        dropped++;
    }
    cache->evicted += dropped;
    return dropped;
}

void tb_cache_stats(const tb_cache *cache, uint64_t *out) {
    out[STAT_STREAMS] = cache->n_streams;
    out[STAT_EVICTED] = cache->evicted;
    for (int i = 0; i < N_REJECTS; i++)
        out[STAT_REJECTS + i] = cache->rejects[i];
}

static int by_arrival(const void *a, const void *b) {
    uint64_t x = ((const struct tb_item *)a)->arrival, y = ((const struct tb_item *)b)->arrival;
    return (x > y) - (x < y);
}

static int matches(const tb_stream *stream, const char *const *prefixes, const uint64_t *sizes,
                   uint32_t n_prefixes) {
    int wanted = 0;
    for (uint32_t i = 0; i < n_prefixes; i++) {
        if (sizes[i] == 0)
            continue; /* an empty prefix is no filter */
        wanted = 1;
        if (sizes[i] <= stream->topic_size && memcmp(stream->topic, prefixes[i], sizes[i]) == 0)
            return 1;
    }
    return !wanted;
}

/* First half of a snapshot: select the cached payloads of every topic starting with one of
 * the prefixes (all of them with none, or only empty ones) in arrival order. Returns how
 * many, and in *bytes the size of the buffer tb_cache_snapshot_copy needs; -1 when out of
 * memory. */
int64_t tb_cache_snapshot_begin(tb_cache *cache, const char *const *prefixes,
                                const uint64_t *prefix_sizes, uint32_t n_prefixes,
                                uint64_t *bytes) {
    free(cache->items);
    cache->items = NULL;
    cache->n_items = 0;
    uint64_t total = 0, n = 0;
    for (const tb_stream *s = cache->oldest; s; s = s->newer)
        if (matches(s, prefixes, prefix_sizes, n_prefixes))
            n += s->count;
    *bytes = 0;
    if (n == 0)
        return 0;
    cache->items = malloc(n * sizeof *cache->items);
    if (cache->items == NULL)
        return -1;
    for (const tb_stream *s = cache->oldest; s; s = s->newer) {
        if (!matches(s, prefixes, prefix_sizes, n_prefixes))
            continue;
        for (uint32_t i = 0; i < s->count; i++) {
            const tb_slot *slot = &s->slots[(s->head + i) % cache->depth];
            cache->items[cache->n_items++] = (struct tb_item){slot->arrival, slot, s};
            total += s->topic_size + slot->size;
        }
    }
    qsort(cache->items, cache->n_items, sizeof *cache->items, by_arrival);
    *bytes = total;
    return (int64_t)cache->n_items;
}

/* Second half: topic and payload of each selected item back to back into `buffer`, their
 * sizes as pairs into `sizes` (2 per item). The selection is freed. */
void tb_cache_snapshot_copy(tb_cache *cache, char *buffer, uint64_t *sizes) {
    for (uint64_t i = 0; i < cache->n_items; i++) {
        const struct tb_item *item = &cache->items[i];
        memcpy(buffer, item->stream->topic, item->stream->topic_size);
        buffer += item->stream->topic_size;
        memcpy(buffer, item->slot->data, item->slot->size);
        buffer += item->slot->size;
        sizes[2 * i] = item->stream->topic_size;
        sizes[2 * i + 1] = item->slot->size;
    }
    free(cache->items);
    cache->items = NULL;
    cache->n_items = 0;
}

void tb_cache_free(tb_cache *cache) {
    if (cache == NULL)
        return;
    while (cache->oldest)
        remove_stream(cache, cache->oldest);
    free(cache->items);
    free(cache->buckets);
    free(cache);
}
