/* The daemon's forwarder with its last-value cache, compiled.
 *
 * Why this exists: the daemon forwards XSUB -> PUB and keeps the last events of every topic
 * for late joiners. Read from Python, the cache's copy of the stream cost ~2 us of
 * interpreter time per event. Read in C from an inproc subscriber of its own beside
 * libzmq's proxy, it still cost the process ~1.3x a bare zmq.proxy: every event went
 * through a second pipe and two more receives, ~100 ms after it had left the CPU's caches
 * (the reader woke in batches, since each wake-up costs CPU of its own). So the forwarding
 * loop is here too (tb_cache_forward, the loop zmq_proxy runs, with ZMQ_DONTWAIT on every
 * receive and send): each event is looked at and cached while it is being forwarded.
 *
 * It is loaded with ctypes by bus/cache.py, which falls back to libzmq's proxy and the
 * Python cache when this library was not built (no C compiler at install time) or libzmq
 * cannot be found. No zmq.h and no Python.h: pyzmq's wheel bundles libzmq without
 * headers, so bus/cache.py hands over the addresses of the libzmq functions used here,
 * taken from the libzmq the process already has loaded (the one pyzmq's sockets live in).
 * zmq_msg_t (64 opaque bytes aligned like a pointer) and zmq_pollitem_t are part of
 * libzmq's stable ABI.
 *
 * What is cached mirrors LastValueCache.feed in bus/cache.py exactly (a differential test
 * in tests/test_cache.py feeds both the same frames through tb_cache_feed, the same checks
 * read from a socket, and another checks that the forwarder caches what tb_cache_feed
 * does): per message, in this order,
 *   one frame only                  -> rejected "bad_frame_count"
 *   more than two frames            -> rejected "bad_frame_count" (all its frames read)
 *   topic + payload > max_size      -> rejected "too_large"
 *   payload empty or not a map      -> rejected "not_a_map"
 *   a new topic the checker refuses -> rejected "bad_topic"
 * otherwise the payload is copied into the topic's ring of the last `depth` payloads. A
 * copy, not the received zmq message: a message received over TCP may be a slice of
 * libzmq's shared 8 KiB receive buffer, and keeping it would keep that whole buffer.
 * Every message is forwarded as it was sent, rejected or not: consumers check for
 * themselves.
 *
 * Threads: the forwarder (one thread, in tb_cache_forward) and the daemon's main thread
 * (snapshots, stats, idle eviction) share the cache under a mutex. The forwarder never
 * waits for it: when the main thread holds it, the forwarder keeps forwarding and parks
 * references to the events (zmq_msg_copy, no data copied) until it gets the lock, at most
 * PENDING_MAX of them; beyond that an event is forwarded but not cached, and counted.
 * Counters the forwarder bumps outside the lock are atomics.
 */

#define _POSIX_C_SOURCE 200809L /* clock_gettime, nanosleep under -std=c11 */

#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    unsigned char opaque[64];
} __attribute__((aligned(sizeof(void *)))) tb_zmq_msg;

typedef int (*msg_init_fn)(tb_zmq_msg *);
typedef int (*msg_close_fn)(tb_zmq_msg *);
typedef int (*msg_recv_fn)(tb_zmq_msg *, void *, int);
typedef void *(*msg_data_fn)(tb_zmq_msg *);
typedef size_t (*msg_size_fn)(const tb_zmq_msg *);
typedef int (*msg_more_fn)(const tb_zmq_msg *);
typedef int (*msg_send_fn)(tb_zmq_msg *, void *, int);
typedef int (*msg_copy_fn)(tb_zmq_msg *, tb_zmq_msg *);
typedef struct {
    void *socket;
    int fd;
    short events;
    short revents;
} tb_pollitem; /* zmq_pollitem_t */
typedef int (*poll_fn)(tb_pollitem *, int, long);
typedef int (*errno_fn)(void);
/* Asked once per new topic: 1 if it is a valid topic (bus/protocol.py decides), else 0. */
typedef int (*topic_ok_fn)(const char *topic, size_t size);

static msg_init_fn zmq_msg_init_;
static msg_close_fn zmq_msg_close_;
static msg_recv_fn zmq_msg_recv_;
static msg_data_fn zmq_msg_data_;
static msg_size_fn zmq_msg_size_;
static msg_more_fn zmq_msg_more_;
static msg_send_fn zmq_msg_send_;
static msg_copy_fn zmq_msg_copy_;
static poll_fn zmq_poll_;
static errno_fn zmq_errno_;

#define TB_DONTWAIT 1 /* ZMQ_DONTWAIT */
#define TB_SNDMORE 2  /* ZMQ_SNDMORE */
#define TB_POLLIN 1   /* ZMQ_POLLIN */
/* Messages forwarded per wake-up before the control socket is looked at again (zmq_proxy's
 * burst is 1000 too). */
#define BURST 1000
/* Events parked while the main thread holds the cache (see the top of this file): at
 * 50k ev/s, 80 ms of traffic; 128 bytes each. */
#define PENDING_MAX 4096

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
    tb_zmq_msg topic, payload;
    double now;
} tb_parked;

typedef struct {
    pthread_mutex_t lock; /* everything below but the atomics and the parked events */
    uint32_t depth;
    uint64_t max_streams;
    uint64_t n_streams;
    uint64_t arrivals;
    uint64_t evicted;
    /* Atomics: bumped by the forwarder with or without the lock. */
    uint64_t rejects[N_REJECTS];
    uint64_t messages, frames, dropped;
    /* The forwarder's alone (n_parked is read by the main thread, atomically). */
    tb_parked *parked;
    uint64_t n_parked;
    tb_stream **buckets;
    uint64_t n_buckets; /* a power of two */
    tb_stream *oldest, *newest;
} tb_cache;

/* One cached payload picked for a snapshot. */
struct tb_item {
    uint64_t arrival;
    const tb_slot *slot;
    const tb_stream *stream;
};

/* Counters handed to Python in one call, in this order. */
enum {
    STAT_STREAMS,
    STAT_EVICTED,
    STAT_MESSAGES,
    STAT_FRAMES,
    STAT_DROPPED,
    STAT_REJECTS,
    N_STATS = STAT_REJECTS + N_REJECTS
};

void tb_bind_libzmq(msg_init_fn init, msg_close_fn close, msg_recv_fn recv, msg_data_fn data,
                    msg_size_fn size, msg_more_fn more, msg_send_fn send, msg_copy_fn copy,
                    poll_fn poll, errno_fn errno_) {
    zmq_msg_init_ = init;
    zmq_msg_close_ = close;
    zmq_msg_recv_ = recv;
    zmq_msg_data_ = data;
    zmq_msg_size_ = size;
    zmq_msg_more_ = more;
    zmq_msg_send_ = send;
    zmq_msg_copy_ = copy;
    zmq_poll_ = poll;
    zmq_errno_ = errno_;
}

static void count(uint64_t *counter, uint64_t n) {
    __atomic_fetch_add(counter, n, __ATOMIC_RELAXED);
}

static uint64_t load(const uint64_t *counter) {
    return __atomic_load_n(counter, __ATOMIC_RELAXED);
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
    cache->parked = malloc(PENDING_MAX * sizeof *cache->parked);
    if (cache->buckets == NULL || cache->parked == NULL ||
        pthread_mutex_init(&cache->lock, NULL) != 0) {
        free(cache->buckets);
        free(cache->parked);
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

/* The checks that need no cache: a reject reason, or -1 when the event may be cached. */
static int precheck(size_t topic_size, size_t payload_size, const unsigned char *payload,
                    uint64_t max_size) {
    if (topic_size + payload_size > max_size)
        return REJECT_TOO_LARGE;
    if (payload_size == 0 || !is_map_marker(payload[0]))
        return REJECT_NOT_A_MAP;
    return -1;
}

/* Cache one event that passed precheck (lock held): 0, or -1 out of memory (not cached). */
static int store_event(tb_cache *cache, const char *topic, size_t topic_size, const void *payload,
                       size_t payload_size, double now, topic_ok_fn topic_ok) {
    uint64_t hash = hash_bytes(topic, topic_size);
    tb_stream *stream = find_stream(cache, topic, topic_size, hash);
    if (stream == NULL) {
        if (!topic_ok(topic, topic_size)) {
            count(&cache->rejects[REJECT_BAD_TOPIC], 1);
            return 0;
        }
        stream = add_stream(cache, topic, topic_size, hash);
        if (stream == NULL)
            return -1;
    } else if (stream != cache->newest) {
        unlink_recency(cache, stream);
        append_recency(cache, stream);
    }
    stream->last_seen = now;
    return store_payload(cache, stream, payload, payload_size);
}

/* Read and cache up to `limit` messages (limit < 0: until the socket has none queued).
 * Returns the messages read (each counted, cached or rejected), or -1 when out of memory
 * (the message being stored is lost; what was read before is accounted). `*frames` gets
 * the frames read. Never blocks on the socket: every receive is ZMQ_DONTWAIT. The same
 * checks and store as the forwarder's, on messages read from a socket: what the daemon's
 * forwarder does to each event, driven the way the Python cache is (the differential
 * test feeds both). */
int64_t tb_cache_feed(tb_cache *cache, void *socket, int64_t limit, double now,
                      uint64_t max_size, topic_ok_fn topic_ok, uint64_t *frames) {
    tb_zmq_msg first, second;
    int64_t seen = 0;
    uint64_t n_frames = 0;
    int failed = 0;
    zmq_msg_init_(&first);
    zmq_msg_init_(&second);
    pthread_mutex_lock(&cache->lock);
    while (limit < 0 || seen < limit) {
        if (zmq_msg_recv_(&first, socket, TB_DONTWAIT) < 0)
            break; /* EAGAIN: nothing queued (or the context is ending) */
        seen++;
        n_frames++;
        if (!zmq_msg_more_(&first)) {
            count(&cache->rejects[REJECT_BAD_FRAME_COUNT], 1);
            continue;
        }
        /* A message's frames arrive together, so the rest is already queued. */
        if (zmq_msg_recv_(&second, socket, TB_DONTWAIT) < 0)
            break;
        n_frames++;
        if (zmq_msg_more_(&second)) {
            while (zmq_msg_more_(&second) && zmq_msg_recv_(&second, socket, TB_DONTWAIT) >= 0)
                n_frames++;
            count(&cache->rejects[REJECT_BAD_FRAME_COUNT], 1);
            continue;
        }
        size_t topic_size = zmq_msg_size_(&first), payload_size = zmq_msg_size_(&second);
        const unsigned char *payload = zmq_msg_data_(&second);
        int reason = precheck(topic_size, payload_size, payload, max_size);
        if (reason >= 0) {
            count(&cache->rejects[reason], 1);
            continue;
        }
        if (store_event(cache, zmq_msg_data_(&first), topic_size, payload, payload_size, now,
                        topic_ok) < 0) {
            failed = 1;
            break;
        }
    }
    pthread_mutex_unlock(&cache->lock);
    zmq_msg_close_(&first);
    zmq_msg_close_(&second);
    count(&cache->messages, (uint64_t)seen);
    count(&cache->frames, n_frames);
    *frames = n_frames;
    return failed ? -1 : seen;
}

static double monotonic_now(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now); /* Python's time.monotonic() on Linux */
    return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

/* Cache the parked events (lock held, forwarder thread). */
static void store_parked(tb_cache *cache, topic_ok_fn topic_ok) {
    for (uint64_t i = 0; i < cache->n_parked; i++) {
        tb_parked *event = &cache->parked[i];
        if (store_event(cache, zmq_msg_data_(&event->topic), zmq_msg_size_(&event->topic),
                        zmq_msg_data_(&event->payload), zmq_msg_size_(&event->payload),
                        event->now, topic_ok) < 0)
            count(&cache->dropped, 1);
        zmq_msg_close_(&event->topic);
        zmq_msg_close_(&event->payload);
    }
    __atomic_store_n(&cache->n_parked, 0, __ATOMIC_RELEASE);
}

/* A two-frame event on its way through: checked, then cached (lock held) or parked. */
static void cache_or_park(tb_cache *cache, tb_zmq_msg *topic, tb_zmq_msg *payload, double now,
                          int locked, uint64_t max_size, topic_ok_fn topic_ok) {
    size_t topic_size = zmq_msg_size_(topic), payload_size = zmq_msg_size_(payload);
    const unsigned char *data = zmq_msg_data_(payload);
    int reason = precheck(topic_size, payload_size, data, max_size);
    if (reason >= 0) {
        count(&cache->rejects[reason], 1);
        return;
    }
    if (locked) {
        if (store_event(cache, zmq_msg_data_(topic), topic_size, data, payload_size, now,
                        topic_ok) < 0)
            count(&cache->dropped, 1);
        return;
    }
    if (cache->n_parked == PENDING_MAX) {
        count(&cache->dropped, 1);
        return;
    }
    tb_parked *event = &cache->parked[cache->n_parked];
    zmq_msg_init_(&event->topic);
    zmq_msg_init_(&event->payload);
    if (zmq_msg_copy_(&event->topic, topic) < 0 || zmq_msg_copy_(&event->payload, payload) < 0) {
        zmq_msg_close_(&event->topic);
        zmq_msg_close_(&event->payload);
        count(&cache->dropped, 1);
        return;
    }
    event->now = now;
    __atomic_store_n(&cache->n_parked, cache->n_parked + 1, __ATOMIC_RELEASE);
}

/* Send one frame on; 0, or -1 when the socket cannot take it (the context is ending). A
 * PUB never refuses for a full subscriber (it drops for that one), so with ZMQ_DONTWAIT
 * this does not block either. */
static int send_frame(tb_zmq_msg *frame, void *pub, int more) {
    return zmq_msg_send_(frame, pub, TB_DONTWAIT | (more ? TB_SNDMORE : 0)) < 0 ? -1 : 0;
}

/* Forward every message from `xsub` to `pub`, frame for frame, and cache each two-frame
 * event on the way, until a message arrives on `control` (returns 0) or libzmq fails (the
 * context is ending; returns -1, zmq_errno() says why). Runs on the daemon's forwarding
 * thread, with the GIL released (ctypes); `topic_ok` takes it, once per new topic. */
int tb_cache_forward(tb_cache *cache, void *xsub, void *pub, void *control, uint64_t max_size,
                     topic_ok_fn topic_ok) {
    /* The PUB is polled too, as zmq_proxy polls its backend: it never becomes readable, but
     * a poll that includes it processes its commands as they come (a new subscriber's pipe,
     * its subscriptions, a queue below its high-water mark again). Not polled, the PUB took
     * them only when it next sent (libzmq then looks at most every ~1 ms): with two CPU hogs
     * running, the live event a late joiner waits for right after its snapshot went missing
     * in 4 of 85 runs of tests/test_smoke_daemon.py's first test; polled, in 0 of 120. */
    tb_pollitem items[3] = {{xsub, 0, TB_POLLIN, 0}, {control, 0, TB_POLLIN, 0},
                            {pub, 0, TB_POLLIN, 0}};
    tb_zmq_msg first, second;
    int result = 0;
    zmq_msg_init_(&first);
    zmq_msg_init_(&second);
    for (;;) {
        /* With events parked, look again within a millisecond to cache them. */
        if (zmq_poll_(items, 3, cache->n_parked ? 1 : -1) < 0) {
            if (zmq_errno_() == EINTR)
                continue;
            result = -1;
            break;
        }
        if (items[1].revents & TB_POLLIN) {
            /* TERMINATE ends forwarding, as for zmq_proxy_steerable; anything else is
             * ignored (STATISTICS is not answered: the counters are tb_cache_stats'). */
            if (zmq_msg_recv_(&first, control, TB_DONTWAIT) >= 0 && zmq_msg_size_(&first) == 9 &&
                memcmp(zmq_msg_data_(&first), "TERMINATE", 9) == 0)
                break;
            continue;
        }
        int locked = pthread_mutex_trylock(&cache->lock) == 0;
        double now = monotonic_now();
        if (locked && cache->n_parked)
            store_parked(cache, topic_ok);
        uint64_t messages = 0, frames = 0;
        for (int n = 0; n < BURST && result == 0; n++) {
            if (zmq_msg_recv_(&first, xsub, TB_DONTWAIT) < 0) {
                int error = zmq_errno_();
                if (error != EAGAIN && error != EINTR)
                    result = -1;
                break;
            }
            messages++;
            frames++;
            if (!zmq_msg_more_(&first)) {
                count(&cache->rejects[REJECT_BAD_FRAME_COUNT], 1);
                result = send_frame(&first, pub, 0);
                continue;
            }
            /* A message's frames arrive together, so the rest is already queued. */
            if (zmq_msg_recv_(&second, xsub, TB_DONTWAIT) < 0) {
                result = -1;
                break;
            }
            frames++;
            if (zmq_msg_more_(&second)) {
                count(&cache->rejects[REJECT_BAD_FRAME_COUNT], 1);
                result = send_frame(&first, pub, 1);
                while (result == 0 && zmq_msg_more_(&second)) {
                    result = send_frame(&second, pub, 1);
                    if (result == 0 && zmq_msg_recv_(&second, xsub, TB_DONTWAIT) < 0)
                        result = -1;
                    else if (result == 0)
                        frames++;
                }
                if (result == 0)
                    result = send_frame(&second, pub, 0);
                continue;
            }
            cache_or_park(cache, &first, &second, now, locked, max_size, topic_ok);
            result = send_frame(&first, pub, 1);
            if (result == 0)
                result = send_frame(&second, pub, 0);
        }
        if (locked)
            pthread_mutex_unlock(&cache->lock);
        count(&cache->messages, messages);
        count(&cache->frames, frames);
        if (result != 0)
            break;
    }
    zmq_msg_close_(&first);
    zmq_msg_close_(&second);
    pthread_mutex_lock(&cache->lock); /* what was forwarded is cached, also at the end */
    store_parked(cache, topic_ok);
    pthread_mutex_unlock(&cache->lock);
    return result;
}

/* Drop the streams silent for longer than idle_s (least recently active first). */
uint64_t tb_cache_evict_idle(tb_cache *cache, double now, double idle_s) {
    uint64_t dropped = 0;
    pthread_mutex_lock(&cache->lock);
    while (cache->oldest && now - cache->oldest->last_seen > idle_s) {
        remove_stream(cache, cache->oldest);
        dropped++;
    }
    cache->evicted += dropped;
    pthread_mutex_unlock(&cache->lock);
    return dropped;
}

void tb_cache_stats(tb_cache *cache, uint64_t *out) {
    pthread_mutex_lock(&cache->lock);
    out[STAT_STREAMS] = cache->n_streams;
    out[STAT_EVICTED] = cache->evicted;
    pthread_mutex_unlock(&cache->lock);
    out[STAT_MESSAGES] = load(&cache->messages);
    out[STAT_FRAMES] = load(&cache->frames);
    out[STAT_DROPPED] = load(&cache->dropped);
    for (int i = 0; i < N_REJECTS; i++)
        out[STAT_REJECTS + i] = load(&cache->rejects[i]);
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

/* Take the lock with no events parked: a snapshot must hold everything forwarded before
 * it was asked for, and events the forwarder parked while the lock was last held are
 * cached by it within a millisecond of the lock coming free. Waits at most ~20 ms. */
static void lock_settled(tb_cache *cache) {
    pthread_mutex_lock(&cache->lock);
    for (int tries = 0; tries < 100 && __atomic_load_n(&cache->n_parked, __ATOMIC_ACQUIRE);
         tries++) {
        pthread_mutex_unlock(&cache->lock);
        nanosleep(&(struct timespec){0, 200 * 1000}, NULL);
        pthread_mutex_lock(&cache->lock);
    }
}

/* A snapshot: the cached payloads of every topic starting with one of the prefixes (all of
 * them with none, or only empty ones) in arrival order, as one buffer of topic and payload
 * back to back per item (*buffer, *bytes long) and their sizes as pairs (*sizes, two per
 * item), both to be handed to tb_release. Returns how many items, -1 when out of memory.
 * One call under the lock, so the forwarder never changes what is being copied. */
int64_t tb_cache_snapshot(tb_cache *cache, const char *const *prefixes,
                          const uint64_t *prefix_sizes, uint32_t n_prefixes, char **buffer,
                          uint64_t **sizes, uint64_t *bytes) {
    *buffer = NULL;
    *sizes = NULL;
    *bytes = 0;
    lock_settled(cache);
    uint64_t total = 0, n = 0;
    for (const tb_stream *s = cache->oldest; s; s = s->newer)
        if (matches(s, prefixes, prefix_sizes, n_prefixes))
            n += s->count;
    struct tb_item *items = n ? malloc(n * sizeof *items) : NULL;
    if (n && items == NULL) {
        pthread_mutex_unlock(&cache->lock);
        return -1;
    }
    uint64_t n_items = 0;
    for (const tb_stream *s = cache->oldest; n && s; s = s->newer) {
        if (!matches(s, prefixes, prefix_sizes, n_prefixes))
            continue;
        for (uint32_t i = 0; i < s->count; i++) {
            const tb_slot *slot = &s->slots[(s->head + i) % cache->depth];
            items[n_items++] = (struct tb_item){slot->arrival, slot, s};
            total += s->topic_size + slot->size;
        }
    }
    int64_t result = (int64_t)n_items;
    if (n_items) {
        qsort(items, n_items, sizeof *items, by_arrival);
        char *out = malloc(total ? total : 1);
        uint64_t *out_sizes = malloc(2 * n_items * sizeof *out_sizes);
        if (out == NULL || out_sizes == NULL) {
            free(out);
            free(out_sizes);
            result = -1;
        } else {
            char *at = out;
            for (uint64_t i = 0; i < n_items; i++) {
                memcpy(at, items[i].stream->topic, items[i].stream->topic_size);
                at += items[i].stream->topic_size;
                memcpy(at, items[i].slot->data, items[i].slot->size);
                at += items[i].slot->size;
                out_sizes[2 * i] = items[i].stream->topic_size;
                out_sizes[2 * i + 1] = items[i].slot->size;
            }
            *buffer = out;
            *sizes = out_sizes;
            *bytes = total;
        }
    }
    pthread_mutex_unlock(&cache->lock);
    free(items);
    return result;
}

/* Hold (1) or release (0) the cache from the calling thread, as a long snapshot would hold
 * it: the tests use it to see the forwarder park events and cache them afterwards. */
void tb_cache_hold(tb_cache *cache, int hold) {
    if (hold)
        pthread_mutex_lock(&cache->lock);
    else
        pthread_mutex_unlock(&cache->lock);
}

uint64_t tb_cache_park_max(void) {
    return PENDING_MAX;
}

void tb_release(void *memory) {
    free(memory);
}

/* Only once the forwarder has returned. */
void tb_cache_free(tb_cache *cache) {
    if (cache == NULL)
        return;
    while (cache->oldest)
        remove_stream(cache, cache->oldest);
    for (uint64_t i = 0; i < cache->n_parked; i++) {
        zmq_msg_close_(&cache->parked[i].topic);
        zmq_msg_close_(&cache->parked[i].payload);
    }
    free(cache->parked);
    free(cache->buckets);
    pthread_mutex_destroy(&cache->lock);
    free(cache);
}
